"""Reproduces the CBIR paper's Tables 1 and 2 over any part of its grid.

  python reproduce.py --datasets=fashion_mnist --archs=small --budget=cpu
  python reproduce.py --datasets=mnist,fashion_mnist,cifar10 --archs=large   # the paper

The checkout's name for the ``jaxcert-reproduce`` program (``python -m jaxcert.reproduce``):
one implementation, :func:`jaxcert.cli.reproduce_main`; the logic lives in
jaxcert.reproduce.
"""

from jaxcert import cli

if __name__ == "__main__":
  cli.reproduce_main()

"""Certifies a trained extractor (l_inf IBP or l_2 randomized smoothing).

  python certify.py --config=configs/quickstart.py --workdir=runs/quickstart
  python certify.py --config=configs/smoothing.py:gdml,0.25 --workdir=runs/gdml25

The checkout's name for the ``jaxcert-certify`` program (``python -m jaxcert.certify``):
one implementation, :func:`jaxcert.cli.certify_main`; the logic lives in
jaxcert.certification and jaxcert.smoothed_certify.
"""

from jaxcert import cli

if __name__ == "__main__":
  cli.certify_main()

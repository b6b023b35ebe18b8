"""``python -m jaxcert.train``: the ``jaxcert-train`` program (:func:`jaxcert.cli.train_main`).

A program, not a module to import: ``jaxcert.train`` is the training function
(:func:`jaxcert.training.train`), which importing this module would shadow.
"""

if __name__ != "__main__":
  raise ImportError("jaxcert/train.py is the `python -m jaxcert.train` program; import "
                    "jaxcert.training (jaxcert.train is its train function) or jaxcert.cli")

from jaxcert import cli  # noqa: E402

cli.train_main()

"""``python -m jaxcert.certify``: the ``jaxcert-certify`` program (``jaxcert.cli.certify_main``).

A program, not a module to import: ``jaxcert.certify`` is the certification function
(:func:`jaxcert.certification.certify`), which importing this module would shadow.
"""

if __name__ != "__main__":
  raise ImportError("jaxcert/certify.py is the `python -m jaxcert.certify` program; import "
                    "jaxcert.certification (jaxcert.certify is its certify function) or "
                    "jaxcert.cli")

from jaxcert import cli  # noqa: E402

cli.certify_main()

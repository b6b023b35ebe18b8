"""``--config=configs/smoothing.py[:METHOD[,SIGMA]]`` from a checkout.

The config itself is bundled with the package, ``jaxcert/configs/smoothing.py``
(``--config=smoothing:...`` wherever jaxcert is installed).
"""

from jaxcert.configs.smoothing import get_config

__all__ = ["get_config"]

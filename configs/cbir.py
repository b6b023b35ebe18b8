"""``--config=configs/cbir.py:DATASET,ARCH,METHOD[,EPS][,BUDGET]`` from a checkout.

The config itself is bundled with the package, ``jaxcert/configs/cbir.py``
(``--config=cbir:...`` wherever jaxcert is installed).
"""

from jaxcert.configs.cbir import get_config

__all__ = ["get_config"]

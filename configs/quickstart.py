"""``--config=configs/quickstart.py[:METHOD]`` from a checkout.

The config itself is bundled with the package, ``jaxcert/configs/quickstart.py``
(``--config=quickstart``, the entry points' default, wherever jaxcert is installed).
"""

from jaxcert.configs.quickstart import get_config

__all__ = ["get_config"]

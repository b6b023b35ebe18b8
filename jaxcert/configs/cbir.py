"""The CBIR paper's grid: ``--config=cbir:DATASET,ARCH,METHOD[,EPS][,BUDGET]``.

DATASET mnist | fashion_mnist | cifar10; ARCH small | large; METHOD triplet | act |
cibp | tbt | fctb; EPS e.g. 0.2 or 2/255 (certification radius); BUDGET paper | cpu.
The settings and our choices where the paper is silent are documented in
``jaxcert/grid.py``. In a checkout ``--config=configs/cbir.py:...`` loads this file too.
"""

from jaxcert.grid import cbir_config


def get_config(arg: str = "fashion_mnist,large,tbt"):
  return cbir_config(arg)

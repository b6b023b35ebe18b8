"""Published numbers of the CBIR paper (Kakizaki et al.), Tables 1 and 2: Large model,
eps = 0.2 (MNIST, Fashion-MNIST) and 2/255 (CIFAR-10), K = 1, 10, 20, 40.

The Small model's and the other eps values' tables are in the paper's appendix,
which is not available; ``lookup`` returns None for them.
"""

from __future__ import annotations

KS = (1, 10, 20, 40)
PAPER_EPS = {"mnist": 0.2, "fashion_mnist": 0.2, "cifar10": 2 / 255}
METHOD_NAMES = {"triplet": "Triplet", "act": "ACT", "cibp": "C-IBP", "tbt": "TBT",
                "fctb": "TBT+FCTB"}

# Table 1: Recall@K.
RECALL = {
    "mnist": {"triplet": (0.99, 1.00, 1.00, 1.00), "act": (0.99, 1.00, 1.00, 1.00),
              "cibp": (0.97, 0.99, 1.00, 1.00), "tbt": (0.94, 0.98, 0.99, 0.99),
              "fctb": (0.93, 0.98, 0.98, 0.99)},
    "fashion_mnist": {"triplet": (0.89, 0.98, 0.99, 0.99), "act": (0.83, 0.97, 0.98, 0.99),
                      "cibp": (0.75, 0.96, 0.98, 0.99), "tbt": (0.62, 0.93, 0.97, 0.98),
                      "fctb": (0.64, 0.94, 0.97, 0.98)},
    "cifar10": {"triplet": (0.58, 0.93, 0.97, 0.99), "act": (0.63, 0.93, 0.96, 0.99),
                "cibp": (0.39, 0.87, 0.94, 0.98), "tbt": (0.18, 0.81, 0.93, 0.97),
                "fctb": (0.19, 0.82, 0.93, 0.97)},
}

# Table 2: (ER QA, CR QA, ER CA, CR CA), each at K = 1, 10, 20, 40.
ROBUST = {
    "mnist": {
        "triplet": ((0.00, 0.05, 0.09, 0.14), (0.00, 0.00, 0.00, 0.00),
                    (0.21, 0.38, 0.47, 0.58), (0.00, 0.00, 0.00, 0.00)),
        "act": ((0.97, 0.99, 1.00, 1.00), (0.00, 0.00, 0.00, 0.00),
                (0.98, 0.99, 1.00, 1.00), (0.00, 0.00, 0.00, 0.00)),
        "cibp": ((0.97, 0.99, 1.00, 1.00), (0.00, 0.00, 0.00, 0.01),
                 (0.96, 0.99, 0.99, 1.00), (0.00, 0.00, 0.00, 0.00)),
        "tbt": ((0.92, 0.98, 0.98, 0.99), (0.03, 0.31, 0.47, 0.65),
                (0.93, 0.98, 0.99, 0.99), (0.01, 0.42, 0.78, 0.95)),
        "fctb": ((0.92, 0.97, 0.98, 0.99), (0.03, 0.30, 0.45, 0.64),
                 (0.92, 0.98, 0.98, 0.99), (0.02, 0.48, 0.82, 0.96)),
    },
    "fashion_mnist": {
        "triplet": ((0.00, 0.09, 0.14, 0.20), (0.00, 0.00, 0.00, 0.00),
                    (0.04, 0.11, 0.14, 0.19), (0.00, 0.00, 0.00, 0.00)),
        "act": ((0.74, 0.95, 0.97, 0.98), (0.00, 0.00, 0.00, 0.00),
                (0.57, 0.92, 0.96, 0.99), (0.00, 0.00, 0.00, 0.00)),
        "cibp": ((0.71, 0.96, 0.98, 0.99), (0.00, 0.01, 0.04, 0.08),
                 (0.67, 0.95, 0.98, 0.99), (0.00, 0.00, 0.00, 0.03)),
        "tbt": ((0.59, 0.93, 0.97, 0.98), (0.02, 0.20, 0.30, 0.45),
                (0.55, 0.93, 0.97, 0.98), (0.00, 0.07, 0.24, 0.64)),
        "fctb": ((0.60, 0.93, 0.97, 0.99), (0.02, 0.22, 0.34, 0.44),
                 (0.55, 0.93, 0.96, 0.98), (0.00, 0.09, 0.25, 0.62)),
    },
    "cifar10": {
        "triplet": ((0.19, 0.70, 0.82, 0.89), (0.00, 0.00, 0.00, 0.00),
                    (0.00, 0.09, 0.25, 0.58), (0.00, 0.00, 0.00, 0.00)),
        "act": ((0.47, 0.88, 0.94, 0.97), (0.00, 0.00, 0.00, 0.00),
                (0.22, 0.72, 0.88, 0.96), (0.00, 0.00, 0.00, 0.00)),
        "cibp": ((0.40, 0.87, 0.94, 0.98), (0.00, 0.04, 0.10, 0.23),
                 (0.35, 0.84, 0.93, 0.98), (0.00, 0.02, 0.08, 0.21)),
        "tbt": ((0.20, 0.79, 0.92, 0.97), (0.02, 0.18, 0.31, 0.48),
                (0.15, 0.78, 0.92, 0.96), (0.00, 0.19, 0.34, 0.58)),
        "fctb": ((0.19, 0.81, 0.93, 0.97), (0.02, 0.20, 0.34, 0.48),
                 (0.17, 0.80, 0.92, 0.97), (0.01, 0.21, 0.44, 0.70)),
    },
}

ROBUST_METRICS = ("er_recall_qa", "cr_recall_qa", "er_recall_ca", "cr_recall_ca")


def lookup(dataset: str, arch: str, method: str, eps: float, metric: str):
  """The paper's values at K = 1, 10, 20, 40 for this cell, or None if unpublished here."""
  if arch != "large" or abs(eps - PAPER_EPS.get(dataset, -1.0)) > 1e-9:
    return None
  if metric == "recall":
    return RECALL.get(dataset, {}).get(method)
  if metric in ROBUST_METRICS:
    row = ROBUST.get(dataset, {}).get(method)
    return None if row is None else row[ROBUST_METRICS.index(metric)]
  return None

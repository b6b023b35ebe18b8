"""jaxcert: certified robust image retrieval in JAX.

Deterministic l_inf certificates for rankings (interval bound propagation,
Kakizaki et al.): ``ibp``, distance bounds, QA/CA rank bounds, verification,
Recall@K and CR-Recall@K, and Triplet/ACT/C-IBP/TBT/FCTB training.

Probabilistic l_2 certificates by randomized smoothing (RetrievalGuard, plus our
half-space and top-K certificates): ``smoothed_embed``, ``certify_smoothed``,
``mc_error_bound``, ``paper_radius``, ``halfspace_radii``; DML/GDML training.

Programs: ``jaxcert-train``, ``jaxcert-certify``, ``jaxcert-reproduce`` (:mod:`jaxcert.cli`,
also ``python -m jaxcert.train`` ...); configs bundled by name: :mod:`jaxcert.configs`.
"""

from jaxcert.certification import certify, certify_features, embed, feature_boxes
from jaxcert.distance import box_distance_bounds, pairwise_distance_bounds, pairwise_distances
from jaxcert.interval import Interval, ibp, input_box, interval_bounds, supported_primitives
from jaxcert.metrics import certified_queries, cr_recall_at_k, recall_at_k
from jaxcert.models import LargeCNN, SmallCNN, apply_fn, make_model
from jaxcert.ranks import (
    RankBounds,
    ca_rank_bounds,
    clean_ranks,
    qa_rank_bounds,
    rank_bounds,
    verify,
    verify_top_k,
)
from jaxcert.smoothing import (
    certify_smoothed,
    halfspace_radii,
    mc_error_bound,
    paper_radius,
    smoothed_embed,
)
from jaxcert.training import train

__version__ = "0.5.0"   # a plain literal: pyproject.toml reads it without importing jax

__all__ = [
    "Interval", "LargeCNN", "RankBounds", "SmallCNN", "apply_fn", "box_distance_bounds",
    "ca_rank_bounds", "certified_queries", "certify", "certify_features", "clean_ranks",
    "cr_recall_at_k", "embed", "feature_boxes", "ibp", "input_box", "interval_bounds",
    "make_model", "pairwise_distance_bounds", "pairwise_distances", "qa_rank_bounds",
    "rank_bounds", "recall_at_k", "supported_primitives", "train", "verify", "verify_top_k",
    "certify_smoothed", "halfspace_radii", "mc_error_bound", "paper_radius", "smoothed_embed",
]

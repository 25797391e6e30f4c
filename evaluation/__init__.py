"""Sample-quality evaluation: FID, KID, precision and recall, feature statistics, toy metrics.

Importing this package never imports torchvision or pytorch_fid; the optional
InceptionV3 backend loads only inside evaluation.features.load_inception, and the FID
Inception of evaluation.inception only when a FidInception is built.
"""

from evaluation.features import (
    FeatureExtractor,
    FlattenFeatures,
    InceptionUnavailableError,
    ModuleFeatures,
    inception_available,
    load_inception,
)
from evaluation.frechet import FrechetReference, frechet_distance
from evaluation.inception import FidInception, fid_inception_available
from evaluation.kid import KID, kid
from evaluation.precision_recall import PrecisionRecall, precision_recall
from evaluation.stats import FeatureStats, load_stats, save_stats
from evaluation.toy25 import Toy25Metrics, toy25_metrics

__all__ = [
    "KID",
    "FeatureExtractor",
    "FeatureStats",
    "FidInception",
    "FlattenFeatures",
    "FrechetReference",
    "InceptionUnavailableError",
    "ModuleFeatures",
    "PrecisionRecall",
    "Toy25Metrics",
    "fid_inception_available",
    "frechet_distance",
    "inception_available",
    "kid",
    "load_inception",
    "load_stats",
    "precision_recall",
    "save_stats",
    "toy25_metrics",
]

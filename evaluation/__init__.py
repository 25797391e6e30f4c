"""Sample-quality evaluation: Frechet distance (FID), feature statistics, toy metrics.

Importing this package never imports torchvision or pytorch_fid; the optional
InceptionV3 backend loads only inside evaluation.features.load_inception.
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
from evaluation.stats import FeatureStats, load_stats, save_stats
from evaluation.toy25 import Toy25Metrics, toy25_metrics

__all__ = [
    "FeatureExtractor",
    "FeatureStats",
    "FlattenFeatures",
    "FrechetReference",
    "InceptionUnavailableError",
    "ModuleFeatures",
    "Toy25Metrics",
    "frechet_distance",
    "inception_available",
    "load_inception",
    "load_stats",
    "save_stats",
    "toy25_metrics",
]

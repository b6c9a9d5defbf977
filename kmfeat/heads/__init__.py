"""Classifier heads trained on cached features: a torch dropout MLP and any scikit-learn classifier."""
from kmfeat.heads.common import Standardizer, classification_metrics, validation_split
from kmfeat.heads.mlp import MLPHead
from kmfeat.heads.sklearn import SklearnHead

HEADS = {"mlp": MLPHead, "sklearn": SklearnHead}

__all__ = ["HEADS", "MLPHead", "SklearnHead", "Standardizer", "classification_metrics", "validation_split"]

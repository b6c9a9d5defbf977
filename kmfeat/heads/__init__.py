"""Classifier heads trained on cached features: a torch dropout MLP and any scikit-learn classifier."""
from kmfeat.heads.common import Standardizer, classification_metrics, validation_split
from kmfeat.heads.mlp import MLPHead
from kmfeat.heads.sklearn import SklearnHead
from kmfeat.heads.svm import LinearSVMHead

HEADS = {"mlp": MLPHead, "sklearn": SklearnHead, "svm": LinearSVMHead}

__all__ = ["HEADS", "LinearSVMHead", "MLPHead", "SklearnHead", "Standardizer", "classification_metrics",
           "validation_split"]

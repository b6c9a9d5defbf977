"""Classifier heads trained on cached features: a torch dropout MLP, a linear L2-SVM, closed-form ridge and any
scikit-learn classifier."""
from kmfeat.heads.common import Standardizer, classification_metrics, validation_split
from kmfeat.heads.mlp import MLPHead
from kmfeat.heads.ridge import RidgeHead
from kmfeat.heads.sklearn import SklearnHead
from kmfeat.heads.svm import LinearSVMHead

HEADS = {"mlp": MLPHead, "ridge": RidgeHead, "sklearn": SklearnHead, "svm": LinearSVMHead}

__all__ = ["HEADS", "LinearSVMHead", "MLPHead", "RidgeHead", "SklearnHead", "Standardizer", "classification_metrics",
           "validation_split"]

"""kmfeat: Coates-style unsupervised feature learning (patches, whitening, k-means, encoding).

`load_features` and `CoatesFeaturizer` are imported on first use, so that `import kmfeat`
and the light CLI stages do not pay for torch.
"""
__version__ = "0.1.0"
__all__ = ["load_features", "CoatesFeaturizer", "__version__"]


def __getattr__(name):
    if name == "load_features":
        from .features import load_features

        return load_features
    if name == "CoatesFeaturizer":
        from .featurizer import CoatesFeaturizer

        return CoatesFeaturizer
    raise AttributeError(f"module 'kmfeat' has no attribute {name!r}")

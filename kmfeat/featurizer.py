"""CoatesFeaturizer: the whole feature pipeline as one scikit-learn transformer.

It calls the same functions as the CLI stages (sample_patches, normalize_patches, Whitener,
KMeans, Encoder), so `Pipeline([("features", CoatesFeaturizer()), ("clf", ...)])` computes
exactly what `kmfeat encode` caches, only in memory.
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .encode import Encoder
from .kmeans import KMeans
from .patches import normalize_patches, sample_patches
from .whiten import Whitener


class CoatesFeaturizer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """fit(images): patches -> whitening -> k-means; transform(images): pooled encodings.

    images are uint8 arrays (N, H, W, C); the output is float32 (N, cells * codes): cells = g*g summed over
    the pyramid levels of `grid`, codes = k (2k with `split`). A fitted featurizer pickles (joblib.dump) and
    loads on any machine, a GPU-fitted one on a CPU-only one too, and transforms as before. precision and
    kmeans_precision are encode.precision and kmeans.precision, "auto" by default as in the config (bf16
    products where the hardware does them natively); "fp32" for float32 products everywhere (what
    pipelines/cifar10.toml pins).
    """

    def __init__(self, rf=6, n_patches=400_000, norm_eps=10.0, whiten="zca", whiten_eps=0.1,
                 k=1600, kmeans_iters=25, kmeans_backend="auto", kmeans_init="random", kind="triangle", alpha=0.5,
                 stride=1, grid=2, device="auto", seed=0, split=False, q=0.25, pool="sum", precision="auto",
                 kmeans_precision="auto"):
        self.rf = rf
        self.n_patches = n_patches
        self.norm_eps = norm_eps
        self.whiten = whiten
        self.whiten_eps = whiten_eps
        self.k = k
        self.kmeans_iters = kmeans_iters
        self.kmeans_backend = kmeans_backend
        self.kmeans_init = kmeans_init
        self.kind = kind
        self.alpha = alpha
        self.stride = stride
        self.grid = grid
        self.device = device
        self.seed = seed
        self.split = split
        self.q = q
        self.pool = pool
        self.precision = precision
        self.kmeans_precision = kmeans_precision

    def fit(self, X, y=None):
        patches = normalize_patches(sample_patches(X, rf=self.rf, n=self.n_patches, seed=self.seed),
                                    eps=self.norm_eps)
        self.whitener_ = Whitener(method=self.whiten, eps=self.whiten_eps).fit(patches)
        self.kmeans_ = KMeans(k=self.k, iters=self.kmeans_iters, seed=self.seed,
                              backend=self.kmeans_backend, device=self.device, init=self.kmeans_init,
                              precision=self.kmeans_precision)
        self.kmeans_.fit(self.whitener_.transform(patches))
        self.encoder_ = Encoder(self.kmeans_.centroids_, self.whitener_.mean_, self.whitener_.W_,
                                rf=self.rf, stride=self.stride, kind=self.kind, alpha=self.alpha,
                                split=self.split, q=self.q, grid=self.grid, pool=self.pool,
                                norm_eps=self.norm_eps, device=self.device, precision=self.precision)
        self.n_features_out_ = self.encoder_.n_features
        return self

    @property
    def _n_features_out(self) -> int:
        """For get_feature_names_out(): coatesfeaturizer0, coatesfeaturizer1, ..."""
        return self.n_features_out_

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "encoder_")
        return self.encoder_.transform(np.asarray(X))

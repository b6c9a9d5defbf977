"""kmfeat: Coates-style unsupervised feature learning (patches, whitening, k-means, encoding)."""
__version__ = "0.1.0"

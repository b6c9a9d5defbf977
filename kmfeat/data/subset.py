"""Fixed, seeded, class-balanced subsets (data.limit_train / data.limit_test)."""
from __future__ import annotations

import numpy as np

from ..errors import KmfeatError


def balanced_subset(y: np.ndarray, limit: int, seed: int = 0, *, what: str = "limit") -> np.ndarray:
    """Sorted indices of a seeded class-balanced subset of `limit` examples of labels `y`.

    Each class (in sorted label order) gets floor(limit / n_classes) examples and the first
    `limit % n_classes` classes one more, drawn without replacement with
    `np.random.default_rng(seed)`. limit <= 0 or >= len(y) selects everything. `what` names
    the parameter in error messages (e.g. "data.limit_train").
    """
    y = np.asarray(y).reshape(-1)
    n = len(y)
    if limit <= 0 or limit >= n:
        return np.arange(n, dtype=np.int64)
    classes = np.unique(y)
    per, extra = divmod(int(limit), len(classes))
    rng = np.random.default_rng(seed)
    picked = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(y == c)
        need = per + (1 if i < extra else 0)
        if len(members) < need:
            raise KmfeatError(f"{what} = {limit}: class {c} has only {len(members)} examples, "
                              f"{need} needed for a balanced subset; lower {what}")
        picked.append(rng.choice(members, size=need, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)

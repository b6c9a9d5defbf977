"""A lazy, read-only row view over memory-mapped feature arrays.

`Rows([(train, fit_idx), (train_flip, fit_idx)])` stands for the concatenation
train[fit_idx] ++ train_flip[fit_idx] without building it: at k = 8000 with mirrored copies
that matrix is 12.8 GB in float32. The heads read it the way they read any 2-d array: `shape`,
`ndim`, `dtype`, `len()`, row slices (chunked passes) and integer index arrays (mini-batches).
Every read returns a new C-contiguous array of `dtype` (float32 unless asked otherwise),
converted from the source dtype (float16 features are fine).

Rows are read in increasing source order (then put back in the order asked for), so a
mini-batch or a chunk is one forward sweep over each file. The pages a read touches in the
mapping count towards this process's resident set, so after every RELEASE_BYTES read from a
source its pages are dropped (madvise DONTNEED via kmfeat.cache.release_pages: they stay in
the page cache and on disk), which keeps RSS bounded by what was asked for, not by the file.
"""
from __future__ import annotations

import numpy as np

from .cache import release_pages

RELEASE_BYTES = 256 << 20
"""Read this many bytes of a source between two release_pages calls on it."""
READ_ROWS_BYTES = 16 << 20
"""Rows are copied out of a source in runs of about this many bytes (bounds the temporaries)."""


def _cast_into(target: np.ndarray, block: np.ndarray) -> None:
    """target[...] = block for float16 block, through torch: several times faster than numpy's scalar
    half-float cast (0.3 vs 2 ns a value on an AMD Zen 4), and exact either way."""
    import torch

    torch.from_numpy(target).copy_(torch.from_numpy(block))


class _Part:
    """One source array and the rows of it that this view shows (None: all of them, in order)."""

    def __init__(self, array, idx):
        if getattr(array, "ndim", None) != 2:
            raise ValueError(f"Rows: every source must be a 2-d array, got shape {getattr(array, 'shape', None)}")
        self.array = array
        if idx is None:
            self.idx = None
            self.n = array.shape[0]
        else:
            idx = np.asarray(idx)
            if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
                raise ValueError("Rows: row indices must be a 1-d integer array")
            idx = idx.astype(np.int64, copy=False)
            if idx.size and (idx.min() < -array.shape[0] or idx.max() >= array.shape[0]):
                raise IndexError(f"Rows: row index out of range for a source of {array.shape[0]} rows")
            self.idx = np.where(idx < 0, idx + array.shape[0], idx)
            self.n = len(self.idx)
        self.read_bytes = 0

    def source_rows(self, local: np.ndarray) -> np.ndarray:
        return local if self.idx is None else self.idx[local]


class Rows:
    """The row-wise concatenation of `parts`, each a 2-d array (typically a read-only memmap) or an
    (array, row indices) pair, read lazily; see the module docstring.

    `rows[i]` is one row, `rows[a:b]` / `rows[index_array]` / `rows[bool_mask]` a new (m, F) array
    of `dtype`, `np.asarray(rows)` the whole matrix (only for small views), `rows.take(positions)`
    the fancy read with an optional `out`.
    """

    ndim = 2

    def __init__(self, parts, dtype=np.float32):
        self._parts = [_Part(*p) if isinstance(p, tuple) else _Part(p, None) for p in parts]
        if not self._parts:
            raise ValueError("Rows: need at least one source")
        widths = {p.array.shape[1] for p in self._parts}
        if len(widths) != 1:
            raise ValueError(f"Rows: sources differ in width {sorted(widths)}")
        self.dtype = np.dtype(dtype)
        self._starts = np.cumsum([0] + [p.n for p in self._parts])
        self.shape = (int(self._starts[-1]), widths.pop())

    def astype(self, dtype) -> "Rows":
        """The same rows, read as `dtype` (no data is read)."""
        view = Rows.__new__(Rows)
        view._parts, view._starts, view.shape, view.dtype = self._parts, self._starts, self.shape, np.dtype(dtype)
        return view

    @property
    def source_dtypes(self) -> list[np.dtype]:
        return [p.array.dtype for p in self._parts]

    @property
    def nbytes(self) -> int:
        """Size of the materialized matrix in `dtype`."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Rows(shape={self.shape}, dtype={self.dtype}, parts={len(self._parts)})"

    def __array__(self, dtype=None, copy=None):
        out = self.take(np.arange(self.shape[0]))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        cols = None
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError("Rows: at most two indices (rows, columns)")
            key, cols = key
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"Rows: row {key} out of range for {self.shape[0]} rows")
            out = self.take(np.array([i]))[0]
        elif isinstance(key, slice):
            out = self.take(np.arange(*key.indices(self.shape[0])))
        else:
            pos = np.asarray(key)
            if pos.dtype == bool:
                if pos.shape != (self.shape[0],):
                    raise IndexError(f"Rows: boolean index of shape {pos.shape} for {self.shape[0]} rows")
                pos = np.flatnonzero(pos)
            out = self.take(pos)
        return out if cols is None else out[..., cols]

    def take(self, positions, out: np.ndarray | None = None) -> np.ndarray:
        """Rows at `positions` (1-d ints; any order, repeats and negatives allowed) as a new (m, F)
        array of `dtype`, or written into `out` (C-contiguous, that shape and dtype)."""
        pos = np.asarray(positions)
        if pos.ndim != 1 or not (pos.size == 0 or np.issubdtype(pos.dtype, np.integer)):
            raise IndexError("Rows: row positions must be a 1-d integer array")
        n = self.shape[0]
        pos = pos.astype(np.int64, copy=False)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            raise IndexError(f"Rows: row position out of range for {n} rows")
        pos = np.where(pos < 0, pos + n, pos)
        shape = (len(pos), self.shape[1])
        if out is None:
            out = np.empty(shape, self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"Rows.take: out must be C-contiguous {shape} {self.dtype}")
        which = np.searchsorted(self._starts, pos, side="right") - 1
        for j, part in enumerate(self._parts):
            dest = np.flatnonzero(which == j) if len(self._parts) > 1 else np.arange(len(pos))
            if len(dest):
                src = part.source_rows(pos[dest] - self._starts[j])
                order = np.argsort(src, kind="stable")
                self._read(part, src[order], dest[order], out)
        return out

    def _read(self, part: _Part, src: np.ndarray, dest: np.ndarray, out: np.ndarray) -> None:
        """out[dest] = part.array[src] for sorted src, in runs of bounded size through two scratch buffers
        at most (fresh temporaries cost a page fault every 4 KB): a run of consecutive source rows is read
        as a slice, the others with np.take; float16 is cast by torch (see _cast)."""
        arr = part.array
        f = arr.shape[1]
        row_bytes = max(1, f * arr.dtype.itemsize)
        step = min(len(src), max(1, READ_ROWS_BYTES // row_bytes))
        same = arr.dtype == out.dtype
        fast = arr.dtype == np.float16 and out.dtype in (np.float32, np.float64)
        in_order = bool(np.all(np.diff(dest) == 1))
        raw = conv = None
        for a in range(0, len(src), step):
            s, d = src[a:a + step], dest[a:a + step]
            m = len(s)
            target = out[d[0]:d[0] + m] if in_order else None
            if s[-1] - s[0] + 1 == m and bool(np.all(np.diff(s) == 1)):  # consecutive rows: a view of the mapping
                block = arr[s[0]:s[-1] + 1]
            elif same and in_order:
                np.take(arr, s, axis=0, out=target, mode="clip")
                block = None
            else:
                raw = np.empty((step, f), arr.dtype) if raw is None else raw
                block = np.take(arr, s, axis=0, out=raw[:m], mode="clip")
            if block is not None:
                if target is None and same:
                    out[d] = block
                else:
                    if target is None:
                        conv = np.empty((step, f), out.dtype) if conv is None else conv
                        target = conv[:m]
                    if fast:
                        if not block.flags.writeable:
                            raw = np.empty((step, f), arr.dtype) if raw is None else raw
                            raw[:m] = block
                            block = raw[:m]
                        _cast_into(target, block)
                    else:
                        target[...] = block
                    if not in_order:
                        out[d] = target
            part.read_bytes += m * row_bytes
            if part.read_bytes >= RELEASE_BYTES:
                self.release(part)

    @staticmethod
    def release(part: _Part) -> None:
        part.read_bytes = 0
        release_pages(part.array)

    def release_all(self) -> None:
        """Drop the mapped pages of every source from the resident set now."""
        for part in self._parts:
            self.release(part)

    def materialize(self) -> np.ndarray:
        """The whole view as one new array of `dtype` (only for views that fit in RAM)."""
        out = self.take(np.arange(self.shape[0]))
        self.release_all()
        return out


class MeanRows(Rows):
    """The row-wise mean of Rows views of one shape: row i is (a[i] + b[i] + ...) / len(views), read lazily
    (each read takes the same positions from every view). Used to fit on each image's features averaged with
    its mirror's: half the rows of the mirrored copies, the very input a mirror-averaging predictor sees."""

    def __init__(self, views, dtype=np.float32):
        views = [v if isinstance(v, Rows) else Rows([v], dtype) for v in views]
        if not views:
            raise ValueError("MeanRows: need at least one view")
        if len({v.shape for v in views}) != 1:
            raise ValueError(f"MeanRows: views differ in shape {sorted({v.shape for v in views})}")
        self.dtype = np.dtype(dtype)
        self._views = [v if v.dtype == self.dtype else v.astype(self.dtype) for v in views]
        self.shape = views[0].shape
        self._scratch = None

    def astype(self, dtype) -> "MeanRows":
        return MeanRows(self._views, dtype)

    @property
    def source_dtypes(self) -> list[np.dtype]:
        return [dt for v in self._views for dt in v.source_dtypes]

    def __repr__(self) -> str:
        return f"MeanRows(shape={self.shape}, dtype={self.dtype}, views={len(self._views)})"

    def take(self, positions, out: np.ndarray | None = None) -> np.ndarray:
        out = self._views[0].take(positions, out)
        if len(self._views) > 1:
            # one scratch buffer kept between reads: fresh pages cost more to fault in than the read itself
            if self._scratch is None or self._scratch.shape[0] < len(out):
                self._scratch = np.empty_like(out)
            more = self._scratch[: len(out)]
            for view in self._views[1:]:
                out += view.take(positions, more)
            out *= 1.0 / len(self._views)
        return out

    def release_all(self) -> None:
        """Drop the sources' mapped pages and the scratch buffer."""
        self._scratch = None
        for view in self._views:
            view.release_all()


def as_rows(X, dtype=np.float32) -> Rows:
    """X itself when it is a Rows view of `dtype`, else a view of X (a Rows or any 2-d array) read as `dtype`."""
    if isinstance(X, Rows):
        return X if X.dtype == np.dtype(dtype) else X.astype(dtype)
    return Rows([X], dtype)

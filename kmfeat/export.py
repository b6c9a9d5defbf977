"""`kmfeat export`: the cached features of an encode entry as one .npz, written only over a regular file."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from .cache import Entry, is_disk_full
from .errors import KmfeatError

KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
         (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def output_path(out) -> Path:
    """The regular file --out names (through a symlink to one): new or existing, never a device, FIFO, socket or
    folder, and in an existing folder; anything else is a KmfeatError naming it."""
    path = Path(out)
    target = Path(os.path.realpath(path))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise KmfeatError(f"--out {out}: cannot use it ({exc.strerror})") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = next((name for test, name in KINDS if test(mode)), "not a regular file")
        raise KmfeatError(f"--out {out}: is {kind}; expected a regular file (new or existing) to write the .npz to")
    if not target.parent.is_dir():
        raise KmfeatError(f"--out {out}: folder {target.parent} does not exist")
    return target


def export_features(entry: Entry, out) -> Path:
    """Write X_train, y_train, X_test, y_test, classes (and X_train_flip / X_test_flip where encoded) of `entry`
    to `out` (a temp file beside it, renamed into place: a failed write leaves the old file as it was)."""
    target = output_path(out)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}.npz")
    try:
        arrays = dict(X_train=entry.array("train"), y_train=entry.array("train_y"), X_test=entry.array("test"),
                      y_test=entry.array("test_y"), classes=np.array(entry.meta["classes"]))
        for name in ("train_flip", "test_flip"):  # the mirrored images' features, when they were encoded
            if entry.has(name):
                arrays[f"X_{name}"] = entry.array(name)
        np.savez(tmp, **arrays)
        os.replace(tmp, target)
    except OSError as exc:
        if is_disk_full(exc):
            raise KmfeatError(f"--out {out}: disk full while writing ({exc.strerror or exc}); free space or choose "
                              f"an --out on a larger disk (nothing was written)") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return target

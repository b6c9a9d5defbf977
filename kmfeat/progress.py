"""Progress bars and one-line status messages, all on stderr so stdout stays parseable."""
import os
import sys

from tqdm.auto import tqdm


def enabled() -> bool:
    """Progress bars are on unless KMFEAT_PROGRESS=0."""
    return os.environ.get("KMFEAT_PROGRESS", "1") != "0"


def bar(iterable=None, total=None, desc=None, unit="it", **kwargs):
    """A tqdm bar on stderr (disabled with KMFEAT_PROGRESS=0)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=not enabled(), dynamic_ncols=True, leave=False, **kwargs)


def say(msg: str) -> None:
    """Print a status line on stderr without breaking an active bar."""
    tqdm.write(str(msg), file=sys.stderr)

"""Memory a stage will need, checked against what the machine has before anything is allocated.

The estimates are lower bounds of a stage's peak (arrays that must be alive at the same time),
so a refusal means the stage cannot run here; passing the check does not promise it fits.
Available memory is MemAvailable + SwapFree from /proc/meminfo, capped by the headroom of a
cgroup memory limit; $KMFEAT_MEMORY_AVAILABLE (a size such as 64G) replaces it, e.g. where
/proc/meminfo does not describe the container. Where neither is known nothing is checked.
Only the standard library is imported: config validation uses this module.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import KmfeatError

ENV = "KMFEAT_MEMORY_AVAILABLE"
CHANNELS = 3
"""Datasets are uint8 RGB (kmfeat.data.Dataset), so patches have rf * rf * 3 values."""
PIL_PIXEL = 4
"""Bytes per pixel of a Pillow RGB image (stored as 32-bit pixels)."""
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_NO_LIMIT = 1 << 60


def human_bytes(n: float) -> str:
    """43_200_000_000_000 -> '43.2 TB' (powers of 1000)."""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB", "ZB"):
        if n < 999.95:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} YB"


def parse_size(text: str, name: str = ENV, examples: str = "64G, 512M or 100000") -> int:
    """'64G', '512M', '1.5T', '100000' -> bytes (K, M, G, T, P are powers of 1024); a KmfeatError naming the
    setting `name` for anything else."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise KmfeatError(f"{name}: got {text!r}, expected a size in bytes such as {examples}")
    return int(value)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _meminfo_values(path: Path) -> dict[str, int]:
    """MemAvailable and SwapFree of /proc/meminfo in bytes (those present; {} where it cannot be read)."""
    values = {}
    try:
        for line in path.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemAvailable", "SwapFree"):
                values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return values


def ram_available(path: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes (RAM only, for budgets that must not spill into swap); None where unknown."""
    return _meminfo_values(path).get("MemAvailable")


def _meminfo(path: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable + SwapFree in bytes, None where /proc/meminfo is missing or has no MemAvailable."""
    values = _meminfo_values(path)
    if "MemAvailable" not in values:
        return None
    return values["MemAvailable"] + values.get("SwapFree", 0)


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Limit - usage + reclaimable page cache of this cgroup (v2, or v1's memory controller);
    None without a limit."""
    for limit, usage, stat, inactive in (
            (root / "memory.max", root / "memory.current", root / "memory.stat", "inactive_file"),
            (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes",
             root / "memory" / "memory.stat", "total_inactive_file")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and cap < _NO_LIMIT and used is not None:
            return max(0, cap - used + _stat_value(stat, inactive))
    return None


def available_memory() -> int | None:
    """Bytes a new allocation can get: $KMFEAT_MEMORY_AVAILABLE if set, else MemAvailable + SwapFree
    capped by the cgroup's headroom; None where unknown."""
    text = os.environ.get(ENV, "").strip()
    if text:
        return parse_size(text)
    found = [v for v in (_meminfo(), _cgroup_headroom()) if v is not None]
    return min(found) if found else None


def _has(available: int) -> str:
    """'this machine has 20.9 GB available' (or what $KMFEAT_MEMORY_AVAILABLE allows), for messages."""
    if os.environ.get(ENV, "").strip():
        return f"{ENV} allows {human_bytes(available)}"
    return f"this machine has {human_bytes(available)} available"


def require(what: str, need: int, needs: str, fix: str) -> None:
    """KmfeatError '<what>: <needs> need <bytes> <why>, this machine has <bytes> available; <fix>' when
    `need` bytes exceed the available memory; `needs` may hold '{need}' where the size goes."""
    available = available_memory()
    if available is not None and need > available:
        raise KmfeatError(f"{what}: {needs.format(need=human_bytes(need))}, {_has(available)}; {fix}")


def patches_bytes(n: int, rf: int, channels: int = CHANNELS) -> int:
    """Peak of the patches stage: sample_patches' float32 (n, rf*rf*C) array and the normalized
    float32 copy normalize_patches makes of it (whiten streams the cached patches; kmeans holds one
    whitened float32 copy, less than this)."""
    return 2 * n * rf * rf * channels * 4


def check_patches(n: int, rf: int, channels: int = CHANNELS) -> None:
    """patches.n x patches.rf against the available memory."""
    need = patches_bytes(n, rf, channels)
    require("patches.n", need, f"{n:,} patches of {rf}x{rf}x{channels} need {{need}} (two float32 copies of "
            f"{human_bytes(need // 2)} while normalizing)", "lower patches.n" + (" or patches.rf" if rf > 32 else ""))


def images_bytes(n: int, height: int, width: int) -> int:
    """Lower bound of loading n images resized to height x width: the uint8 (n, H, W, 3) array plus
    one image in Pillow while it is resized."""
    return (n * CHANNELS + PIL_PIXEL) * height * width


def check_images(n: int, size, what: str = "data.resize", note: str = "", fix: str = "") -> None:
    """Call in the data stage before allocating n decoded / resized images of `size` = (H, W), once
    n is known (`fix` defaults to 'lower <what>'; images kept at their own size want 'set data.resize')."""
    if not size:
        return
    h, w = (int(v) for v in size)
    require(what, images_bytes(n, h, w), f"{n:,} images{note} of {h}x{w} need {{need}} "
            f"({human_bytes(n * CHANNELS * h * w)} in uint8 RGB plus {human_bytes(PIL_PIXEL * h * w)} for the one "
            f"Pillow decodes)", fix or f"lower {what}")


def check_config(cfg) -> None:
    """What a PipelineConfig alone shows: the patches stage, and data.resize for the smallest
    dataset (1 train + 1 test image; the data stage knows the real count)."""
    check_patches(cfg.patches.n, cfg.patches.rf)
    if cfg.data.resize:
        check_images(2, cfg.data.resize, note=" (1 train + 1 test, the fewest a dataset has)")

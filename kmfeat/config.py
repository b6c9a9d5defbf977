"""Typed pipeline configuration: TOML files in pipelines/ parsed into dataclasses.

Unknown sections/keys and wrong types are errors that name the key and what is valid.
`-o section.key=value` overrides any value; the value is parsed as TOML (so `8`, `0.5`,
`true`, `"mlp"`, `[32, 32]`, `{C = 0.1}` all work) and a bare word is taken as a string.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import KmfeatError


@dataclass
class DataConfig:
    """Where the images come from (`--data` sets `path`)."""
    source: Literal["cifar10", "cifar100", "stl10", "imagefolder", "auto"] = "cifar10"
    path: str = ""
    unlabeled: str = ""  # an extra folder, archive or release whose images join the unlabeled split (--unlabeled)
    resize: list[int] = field(default_factory=list)
    limit_train: int = 0
    limit_test: int = 0
    seed: int = 0


@dataclass
class PatchesConfig:
    """Random patches for learning the dictionary, from the labeled training images, the unlabeled
    ones, or both (auto: unlabeled when the dataset has an unlabeled split, else train)."""
    source: Literal["auto", "train", "unlabeled", "all"] = "auto"
    rf: int = 6
    n: int = 400_000
    norm_eps: float = 10.0
    seed: int = 0


@dataclass
class WhitenConfig:
    method: Literal["zca", "pca", "none"] = "zca"
    eps: float = 0.1


@dataclass
class KMeansConfig:
    k: int = 1600
    iters: int = 25
    seed: int = 0
    backend: Literal["auto", "faiss", "torch"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    init: Literal["random", "k-means++"] = "random"
    precision: Literal["fp32", "bf16", "auto"] = "auto"  # the assignment's products x.c (README: kmeans.precision)


@dataclass
class EncodeConfig:
    """Dense codes: triangle, hard, soft (threshold alpha) or knn (1 for the q nearest centroids).
    split: soft and knn codes for both signs of the patch (2k codes per position)."""
    kind: Literal["triangle", "hard", "soft", "knn"] = "triangle"
    stride: int = 1
    alpha: float = 0.5
    split: bool = False
    q: float = 0.25
    dtype: Literal["float32", "float16"] = "float32"
    flip_test: bool = False
    flip_train: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch: int = 0
    precision: Literal["fp32", "bf16", "auto"] = "auto"  # the centroid product z.c (README: encode.precision)


@dataclass
class PoolConfig:
    """grid: one grid size or a spatial pyramid such as [1, 2, 4] (levels concatenated in list order)."""
    grid: int | list[int] = 2
    kind: Literal["sum", "mean", "max"] = "sum"


@dataclass
class HeadConfig:
    """Classifier on the cached features: the torch dropout MLP, the torch linear L2-SVM
    (C from grid.C, chosen on val) or any scikit-learn classifier (estimator + params + grid)."""
    kind: Literal["mlp", "svm", "ridge", "sklearn"] = "mlp"
    val: int | float = 0.1  # validation images held out of train: a count, or a fraction (0.1: 5,000 of CIFAR-10)
    power: float = 1.0
    tta: bool = False
    folds: Literal["none", "stl10"] = "none"  # stl10: one head per predefined fold, mean ± std (STL-10 protocol)
    mirrors: Literal["rows", "mean"] = "rows"
    refit: bool = False
    seed: int = 0
    hidden: int = 512
    bottleneck: int = 0  # > 0: each pooled cell's codes share one projection to this many values (kmfeat.heads.cells)
    dropout: float = 0.5
    input_dropout: float = 0.0
    epochs: int = 40
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["cosine", "step", "none"] = "cosine"
    patience: int = 8
    label_smoothing: float = 0.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    estimator: str = "LinearSVC"
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    patches: PatchesConfig = field(default_factory=PatchesConfig)
    whiten: WhitenConfig = field(default_factory=WhitenConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    name: str = "pipeline"

    def section(self, name: str) -> dict:
        """A section's values as a plain dict (what cache keys are built from)."""
        return dataclasses.asdict(getattr(self, name))


SECTIONS = [f.name for f in dataclasses.fields(PipelineConfig) if f.name != "name"]


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    return getattr(origin or tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is types.UnionType:
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except KmfeatError:
                pass
        raise KmfeatError(f"{key}: got {value!r}, expected " + " or ".join(map(_type_name, typing.get_args(tp))))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise KmfeatError(f"{key}: got {value!r}, expected {_type_name(tp)}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or tp is float and isinstance(value, bool):
        raise KmfeatError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise KmfeatError(f"{key}: got {value!r}, expected a list of {_type_name(item)}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise KmfeatError(f"{key}: got {value!r}, expected a table like {{name = value}}")
        return dict(value)
    if not isinstance(value, tp):
        raise KmfeatError(f"{key}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")
    return value


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise KmfeatError(f"{prefix}{key}: unknown key; valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """['kmeans.k=4000', 'head.params.C=0.1'] -> nested dict."""
    nested: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise KmfeatError(f"-o {item}: expected section.key=value, e.g. -o kmeans.k=4000")
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise KmfeatError(f"-o {item}: {part} is set twice")
        node[parts[-1]] = _parse_value(text.strip())
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("params", "grid"):
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def from_dict(raw: dict, name: str = "pipeline") -> PipelineConfig:
    """Validate a nested dict (as read from TOML) into a PipelineConfig."""
    raw = dict(raw)
    name = raw.pop("name", name)
    sections = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            raise KmfeatError(f"{key}: unknown section; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise KmfeatError(f"{key}: expected a [{key}] table")
        hints = typing.get_type_hints(PipelineConfig)
        sections[key] = _build(hints[key], value, f"{key}.")
    return PipelineConfig(name=str(name), **sections)


def load(path: str | Path | None, overrides=(), data: str | None = None, unlabeled: str | None = None
         ) -> PipelineConfig:
    """Read a pipeline TOML (None: all defaults), apply `-o` overrides, `--data` and `--unlabeled`."""
    raw: dict = {}
    name = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise KmfeatError(f"--pipeline {path}: no such file (see pipelines/*.toml)")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise KmfeatError(f"{path}: not valid TOML: {exc}") from None
        name = path.stem
    extra = parse_overrides(list(overrides))
    head, new_head = raw.get("head"), extra.get("head")
    switched = isinstance(head, dict) and isinstance(new_head, dict) and \
        new_head.get("kind", head.get("kind")) != head.get("kind")
    if switched:
        # head.grid and head.params were written for the file's head kind, not the one -o switches to
        raw = {**raw, "head": {k: v for k, v in head.items() if k not in ("grid", "params")}}
    raw = _merge(raw, extra)
    if data:
        raw = _merge(raw, {"data": {"path": str(data)}})
    if unlabeled:
        raw = _merge(raw, {"data": {"unlabeled": str(unlabeled)}})
    cfg = from_dict(raw, name)
    validate(cfg)
    return cfg


SEED_MAX = 2**31 - 1
"""Largest seed every consumer takes (faiss stores it in a C int)."""
INT_MAX = 2**63 - 1
"""Larger integers overflow numpy's and torch's int64."""


def _positive(key: str, value, minimum=1):
    if value < minimum:
        raise KmfeatError(f"{key}: got {value}, expected >= {minimum}")


def _no_nan(key: str, value) -> None:
    """NaN anywhere in a head.params / head.grid value (a table, list or number) is an error."""
    if isinstance(value, float) and math.isnan(value):
        raise KmfeatError(f"{key}: got nan, expected a number")
    if isinstance(value, dict):
        for k, v in value.items():
            _no_nan(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_nan(f"{key}[{i}]", v)


def _check_fields(cfg: PipelineConfig, late_keys: frozenset[str] = frozenset()) -> None:
    """Checks by field type over every section: floats are finite, ints fit int64 (except `late_keys`,
    which later checks explain better), seeds are in 0..SEED_MAX, head.params / head.grid hold no NaN."""
    for section in SECTIONS:
        values = getattr(cfg, section)
        hints = typing.get_type_hints(type(values))
        for f in dataclasses.fields(values):
            key, value, tp = f"{section}.{f.name}", getattr(values, f.name), hints[f.name]
            if tp is float and not math.isfinite(value):
                raise KmfeatError(f"{key}: got {value}, expected a finite number")
            if f.name == "seed" or f.name.endswith("_seed"):
                if not 0 <= value <= SEED_MAX:
                    raise KmfeatError(f"{key}: got {value}, expected an integer in 0..{SEED_MAX}")
            elif tp is int and value > INT_MAX and key not in late_keys:
                raise KmfeatError(f"{key}: got {value}, expected an integer below 2**63")
            elif isinstance(value, dict):
                _no_nan(key, value)


def _check_head(h: HeadConfig) -> None:
    """The MLP's settings, checked whatever head.kind is (the defaults pass; other heads ignore them)."""
    for key, value in (("hidden", h.hidden), ("epochs", h.epochs), ("batch", h.batch), ("patience", h.patience)):
        _positive(f"head.{key}", value)
    if not h.lr > 0:
        raise KmfeatError(f"head.lr: got {h.lr}, expected > 0 (the MLP's learning rate, e.g. 0.001)")
    if h.weight_decay < 0:
        raise KmfeatError(f"head.weight_decay: got {h.weight_decay}, expected >= 0")
    if isinstance(h.bottleneck, bool) or not isinstance(h.bottleneck, int) or h.bottleneck < 0:
        raise KmfeatError(f"head.bottleneck: got {h.bottleneck!r}, expected an integer >= 0 (0: the plain MLP)")
    if not 0 <= h.label_smoothing < 1:
        raise KmfeatError(f"head.label_smoothing: got {h.label_smoothing}, expected 0 <= label_smoothing < 1")


def validate(cfg: PipelineConfig) -> None:
    """Range checks that need no data (data-dependent ones happen in the stages), then the memory
    the patches and data stages need at least (kmfeat.memory), so that an impossible setting fails
    before the first stage runs."""
    from . import memory

    late = {"patches.n": cfg.patches.n, "kmeans.k": cfg.kmeans.k}  # checked against memory and patches.n below
    _check_fields(cfg, frozenset(late))
    _positive("patches.rf", cfg.patches.rf)
    _positive("patches.n", cfg.patches.n)
    _positive("kmeans.k", cfg.kmeans.k)
    _positive("kmeans.iters", cfg.kmeans.iters)
    if cfg.kmeans.iters > SEED_MAX:
        raise KmfeatError(f"kmeans.iters: got {cfg.kmeans.iters}, expected an integer in 1..{SEED_MAX}")
    if cfg.kmeans.k > cfg.patches.n:
        raise KmfeatError(f"kmeans.k: {cfg.kmeans.k:,} clusters but only {cfg.patches.n:,} patches (patches.n); "
                          f"k-means needs at least k patches: lower kmeans.k or raise patches.n")
    _positive("encode.stride", cfg.encode.stride)
    grids = cfg.pool.grid if isinstance(cfg.pool.grid, list) else [cfg.pool.grid]
    if not grids or len(set(grids)) != len(grids) or min(grids) < 1:
        raise KmfeatError(f"pool.grid: got {cfg.pool.grid!r}, expected a grid size >= 1 or a list of "
                          f"distinct sizes >= 1, e.g. [1, 2, 4]")
    q = cfg.encode.q
    if not (0 < q < 1 or (q >= 1 and q == int(q))):
        raise KmfeatError(f"encode.q: got {q}, expected a fraction of k in (0, 1) or a whole count >= 1")
    if cfg.encode.kind == "knn" and q > cfg.kmeans.k:
        raise KmfeatError(f"encode.q: got {q:g}, expected a fraction of k in (0, 1) or a whole count "
                          f"up to kmeans.k = {cfg.kmeans.k}")
    if cfg.encode.split and cfg.encode.kind not in ("soft", "knn"):
        raise KmfeatError(f"encode.split: only the soft and knn codes have a sign split, not {cfg.encode.kind!r}")
    if not cfg.head.power > 0:
        raise KmfeatError(f"head.power: got {cfg.head.power}, expected > 0 (1 = off, 0.5 = signed square root)")
    _positive("data.limit_train", cfg.data.limit_train, 0)
    _positive("data.limit_test", cfg.data.limit_test, 0)
    _positive("encode.batch", cfg.encode.batch, 0)
    v = cfg.head.val
    if not ((isinstance(v, int) and v >= 0) or (isinstance(v, float) and 0 < v < 1)):
        raise KmfeatError(f"head.val: got {v!r}, expected a count of validation images >= 0 (0: none) or a "
                          f"fraction of the training images in (0, 1), e.g. 0.1")
    if cfg.patches.norm_eps <= 0:
        raise KmfeatError(f"patches.norm_eps: got {cfg.patches.norm_eps}, expected > 0 (flat patches "
                          f"would divide by zero)")
    if cfg.whiten.eps < 0:
        raise KmfeatError(f"whiten.eps: got {cfg.whiten.eps}, expected >= 0")
    if cfg.encode.alpha < 0:
        raise KmfeatError(f"encode.alpha: got {cfg.encode.alpha}, expected >= 0")
    if not 0 <= cfg.head.dropout < 1:
        raise KmfeatError(f"head.dropout: got {cfg.head.dropout}, expected 0 <= dropout < 1")
    if not 0 <= cfg.head.input_dropout < 1:
        raise KmfeatError(f"head.input_dropout: got {cfg.head.input_dropout}, expected 0 <= dropout < 1")
    if cfg.head.refit and cfg.head.kind == "mlp":
        raise KmfeatError("head.refit: only the svm, ridge and sklearn heads refit on train + val "
                          "(the MLP's epoch is chosen on val); set head.refit = false")
    if cfg.data.resize and (len(cfg.data.resize) != 2 or min(cfg.data.resize) < 1):
        raise KmfeatError(f"data.resize: got {cfg.data.resize}, expected [H, W] with H, W >= 1")
    if cfg.data.resize and cfg.patches.rf > min(cfg.data.resize):
        raise KmfeatError(f"patches.rf: got {cfg.patches.rf}, expected at most the image size "
                          f"{cfg.data.resize[0]}x{cfg.data.resize[1]} (data.resize)")
    _check_head(cfg.head)
    memory.check_config(cfg)
    for key, value in late.items():  # where the available memory is unknown
        if value > INT_MAX:
            raise KmfeatError(f"{key}: got {value}, expected an integer below 2**63")

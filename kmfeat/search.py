"""`kmfeat search`: Optuna over a head's parameters (and `head.power`) on cached features.

Each trial fits the pipeline's head with sampled settings on the fit part of the training split
(or a seeded class-balanced subset of it, with the mirrors of those images when flips were
encoded) and is scored on the validation split held out exactly as `kmfeat train` holds it out
(`head.val`, `head.seed`). The test split is never read. The first STARTUP trials sample at
random, later ones with TPE (both seeded).

A study lives in cache/search/<key>/ (study.db: Optuna's SQLite storage; trials.csv,
search.png, best.toml; manifest.json), key = hash of the encode key, head kind, the head's
fixed settings, the search space, --subset and --seed. Rerunning with a larger --trials runs
only the missing trials (COMPLETE ones count; failed or interrupted ones are recorded as FAIL and
do not count); --force starts afresh. A per-key lock (the Store's) keeps two searches on one key
from running trials at once (the second waits, then finds the trials done), and the manifest
makes the folder a store entry (`kmfeat cache ls` lists it; cleaning never takes it for a leftover).

Adding a head kind is one SPACES entry: {parameter: Param}, where a Param says its range and
whether the value goes to a HeadConfig field, a one-value `head.grid` entry or `head.params`.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import time
import tomllib
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .cache import MANIFEST, Entry, Store, make_key
from .config import HeadConfig, PipelineConfig, from_dict, validate
from .errors import KmfeatError
from .progress import say

STARTUP = 8
"""Random trials before TPE takes over (counted over the whole study, so a resumed one continues)."""
STUDY = "search"
FILES = ("trials.csv", "search.png", "best.toml")


@dataclass(frozen=True)
class Param:
    """One searched value: a float or int range (log-uniform with log=True) or a list of choices.

    target: "field" sets the HeadConfig field of that name, "grid" a one-value head.grid entry
    (how the svm head takes C), "params" a head.params entry (removed from head.grid).
    """
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    integer: bool = False
    choices: tuple = ()
    target: str = "field"

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices:
            return CategoricalDistribution(self.choices)
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def describe(self) -> dict:
        if self.choices:
            return {"choices": list(self.choices), "target": self.target}
        return {"low": self.low, "high": self.high, "log": self.log, "int": self.integer, "target": self.target}


POWER = Param(0.25, 1.0)
"""head.power: signed power of the features before standardization (1 = off, 0.5 = signed square root)."""


def _sklearn_space(h: HeadConfig) -> dict[str, Param]:
    """The keys of head.grid: positive numbers as a log range from their smallest to largest value
    (one value v: v/10 .. 10 v), ints as int ranges, anything else as a list of choices."""
    if not h.grid:
        raise KmfeatError("head.grid: a search of a sklearn head samples the keys of head.grid between their "
                          "smallest and largest values; give some, e.g. -o 'head.grid={C=[0.0001, 1.0]}'")
    space = {}
    for name, values in h.grid.items():
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if values and numbers and min(values) > 0:
            integer = all(isinstance(v, int) for v in values)
            low, high = min(values), max(values)
            if low == high:
                low, high = (max(1, low // 10), high * 10) if integer else (low / 10, high * 10)
            space[name] = Param(low, high, log=True, integer=integer, target="params")
        elif values and all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            space[name] = Param(choices=tuple(dict.fromkeys(values)), target="params")
        else:
            raise KmfeatError(f"head.grid.{name}: a search samples positive numbers (log range) or picks among "
                              f"plain values (numbers, strings, booleans); got {values!r}")
    return {**space, "power": POWER}


SPACES: dict[str, dict[str, Param] | Callable[[HeadConfig], dict[str, Param]]] = {
    "mlp": {"lr": Param(1e-4, 1e-2, log=True), "weight_decay": Param(1e-6, 1e-1, log=True),
            "dropout": Param(0.0, 0.7), "hidden": Param(64, 1024, log=True, integer=True), "power": POWER},
    "svm": {"C": Param(1e-5, 1.0, log=True, target="grid"), "power": POWER},
    "ridge": {"alpha": Param(1e-2, 1e5, log=True, target="grid"), "power": POWER},
    "sklearn": _sklearn_space,
}


def search_space(h: HeadConfig) -> dict[str, Param]:
    """{parameter: Param} searched for this head."""
    if h.kind not in SPACES:
        raise KmfeatError(f"head.kind = {h.kind!r}: no search space for this head; searchable: {', '.join(SPACES)}")
    if importlib.util.find_spec(f"kmfeat.heads.{h.kind}") is None:
        raise KmfeatError(f"head.kind = {h.kind!r}: this kmfeat has no {h.kind} head (kmfeat/heads/{h.kind}.py)")
    space = SPACES[h.kind]
    return dict(space(h) if callable(space) else space)


def apply_params(h: HeadConfig, params: dict[str, Any], space: dict[str, Param]) -> HeadConfig:
    """The HeadConfig with a trial's values put where its space says."""
    fields, grid, extra = {}, dict(h.grid), dict(h.params)
    for name, value in params.items():
        target = space[name].target
        if target == "field":
            fields[name] = value
        elif target == "grid":
            grid[name] = [value]
        else:
            extra[name] = value
            grid.pop(name, None)
    return dataclasses.replace(h, grid=grid, params=extra, **fields)


def check_args(trials: int, timeout: float | None, subset: int, seed: int) -> None:
    """Argument checks that need no data."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise KmfeatError(f"--trials: got {trials!r}, expected an integer >= 1")
    if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise KmfeatError(f"--timeout: got {timeout!r}, expected a number of seconds > 0")
    if isinstance(subset, bool) or not isinstance(subset, int) or subset < 0:
        raise KmfeatError(f"--subset: got {subset!r}, expected an integer >= 0 (0: the whole fit split)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise KmfeatError(f"--seed: got {seed!r}, expected an integer >= 0")


def search_rows(features: Entry, h: HeadConfig, subset: int = 0, seed: int = 0):
    """(X_fit, y_fit, X_val, y_val): val held out of the train images as `kmfeat train` does; the fit
    part is all other train images, or a seeded class-balanced subset of `subset` of them, plus their
    mirrors when flips were encoded (averaged with them: head.mirrors = "mean"). Test rows are never read."""
    from .data.subset import balanced_subset
    from .heads.common import validation_split
    from .train import split_features, training_rows, validation_rows

    if h.val == 0:
        raise KmfeatError("head.val = 0: a search scores every trial on the validation split held out of train; "
                          "set head.val > 0, e.g. -o head.val=5000")
    if not subset:
        X_fit, y_fit, X_val, y_val, _ = split_features(features, h.val, h.seed, h.mirrors == "mean")
        return X_fit, y_fit, X_val, y_val
    y = np.asarray(features.array("train_y"))
    fit_idx, val_idx = validation_split(y, h.val, h.seed)
    n_classes = len(np.unique(y[fit_idx]))
    if not n_classes <= subset <= len(fit_idx):
        raise KmfeatError(f"--subset {subset}: expected at least one image per class ({n_classes}) and at most the "
                          f"{len(fit_idx):,} images of the fit split ({len(y):,} train images minus the "
                          f"{len(val_idx):,} of head.val = {h.val}); use --subset 0 for all of them")
    picked = fit_idx[balanced_subset(y[fit_idx], subset, seed, what="--subset")]
    mean = h.mirrors == "mean"
    X_fit, y_fit = training_rows(features, picked, mean)
    return X_fit, y_fit, validation_rows(features, val_idx, mean), y[val_idx]


def _fixed_head(h: HeadConfig, space: dict[str, Param]) -> dict:
    """The head settings a search keeps fixed (part of its key): all but the searched ones, the
    device and refit (a search never refits)."""
    fixed = dataclasses.asdict(h)
    for name in ("device", "refit"):
        fixed.pop(name)
    for name, p in space.items():
        if p.target == "field":
            fixed.pop(name, None)
        else:
            fixed[p.target].pop(name, None)
    return fixed


def search_key(features: Entry, h: HeadConfig, space: dict[str, Param], subset: int, seed: int) -> tuple[str, dict]:
    params = {"kind": h.kind, "subset": subset, "seed": seed,
              "space": {name: p.describe() for name, p in space.items()}, "head": _fixed_head(h, space)}
    return make_key("search", params, {"encode": features.key}), params


# ---------------------------------------------------------------------------------------------
# files


def _atomic_write(path: Path, data: str | bytes) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def pipeline_toml(cfg: PipelineConfig, header: str = "") -> str:
    """A pipeline as TOML that `config.load` reads back into an equal PipelineConfig."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines.append(f"name = {_toml_value(cfg.name)}")
    for section in ("data", "patches", "whiten", "kmeans", "encode", "pool", "head"):
        lines += ["", f"[{section}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in cfg.section(section).items()]
    text = "\n".join(lines) + "\n"
    if from_dict(tomllib.loads(text)) != cfg:
        raise RuntimeError("pipeline_toml: the written TOML does not read back as the same pipeline")
    return text


def _trial_rows(study) -> list[dict]:
    from optuna.trial import TrialState

    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        rows.append({"number": t.number, "state": t.state.name,
                     "val_accuracy": t.value if t.state == TrialState.COMPLETE else None,
                     "params": dict(t.params), "sampler": t.user_attrs.get("sampler"),
                     "seconds": t.user_attrs.get("seconds"), "n_fit": t.user_attrs.get("n_fit"),
                     "n_val": t.user_attrs.get("n_val"),
                     "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else ""})
    return rows


def trials_csv(rows: list[dict], names: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial", "state", "val_accuracy", *names, "sampler", "seconds", "n_fit", "n_val", "started"])
    for r in rows:
        writer.writerow([r["number"], r["state"], "" if r["val_accuracy"] is None else f"{r['val_accuracy']:.6f}",
                         *(r["params"].get(n, "") for n in names), r["sampler"] or "",
                         "" if r["seconds"] is None else f"{r['seconds']:.2f}", r["n_fit"] or "", r["n_val"] or "",
                         r["started"]])
    return out.getvalue()


def _importance(study, seed: int) -> dict[str, float]:
    """fANOVA importance of each parameter (empty with fewer than 2 finished trials or if it fails)."""
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}
    return {k: float(v) for k, v in found.items() if math.isfinite(v)}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# the search


@dataclass
class SearchResult:
    folder: Path
    trials: int
    ran: int
    seconds: float
    best_value: float
    best_trial: int
    best_params: dict

    def summary(self) -> str:
        return (f"search: {self.trials} trials complete ({self.ran} run now) in {self.seconds:.1f} s; best val "
                f"accuracy {self.best_value:.4f} (trial {self.best_trial}) -> {self.folder}/ "
                f"({', '.join(FILES)})")


def _write_manifest(folder: Path, key: str, params: dict, features: Entry, meta: dict) -> None:
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST,)
                   and not p.name.endswith(".part"))
    manifest = {"stage": "search", "key": key, "params": params, "inputs": {"encode": features.key},
                "kmfeat_version": __version__, "arrays": {}, "files": files,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "meta": meta}
    _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2, default=str))


def _open_study(folder: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.create_study(storage=f"sqlite:///{folder.resolve() / 'study.db'}", study_name=STUDY,
                                   direction="maximize", load_if_exists=True)


def _sampler(seed: int, n_trials: int):
    """TPE after STARTUP random trials, seeded by (seed, trials so far) so a resumed study draws new points."""
    import optuna

    state = int(np.random.SeedSequence([seed, n_trials]).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.samplers.TPESampler(n_startup_trials=STARTUP, seed=state)


def fit_and_score(h: HeadConfig, X_fit, y_fit, X_val, y_val, cells: int = 1) -> tuple[float, Any]:
    """Validation accuracy of the head `h` fit on (X_fit, y_fit) (val given for its own early stopping);
    `cells`: pooled cells per feature row (kmfeat.train.feature_cells)."""
    from .train import make_head

    head = make_head(h, cells=cells).fit(X_fit, y_fit, X_val, y_val)
    return float((head.predict(X_val) == y_val).mean()), head


def search_features(cfg: PipelineConfig, features: Entry, store: Store, trials: int, timeout: float | None = None,
                    subset: int = 0, seed: int = 0, force: bool = False, log=say) -> SearchResult:
    """Run the search on a finished encode entry until the study has `trials` complete trials, or
    until `timeout` seconds of trials passed (no trial starts after that; a run always starts one);
    then write trials.csv, search.png and best.toml. `force` discards the study first."""
    from optuna.trial import TrialState

    from .train import feature_cells

    start = time.time()
    check_args(trials, timeout, subset, seed)
    h = cfg.head
    space = search_space(h)
    X_fit, y_fit, X_val, y_val = search_rows(features, h, subset, seed)
    key, params = search_key(features, h, space, subset, seed)
    folder = store.entry_dir("search", key)
    distributions = {name: p.distribution() for name, p in space.items()}
    with store.reading([features]), \
            store.lock("search", key, on_wait=lambda: log(f"search: another search is running this study ({key}); "
                                                           f"waiting for it ...")):
        if force and folder.exists():
            store.remove(folder)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            entry = store.get("search", key)
        except KmfeatError:  # unreadable manifest: written again below
            entry = None
        if entry is None:  # first thing: a folder without a manifest is a leftover that a run would clean
            _write_manifest(folder, key, params, features, {})
        study = _open_study(folder)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            study.tell(t.number, state=TrialState.FAIL)  # left by a killed run: we hold the lock
        complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        study.sampler = _sampler(seed, len(study.trials))
        if complete >= trials:
            log(f"search: {complete} trials already complete in {folder} (--trials {trials}); nothing to run")
        else:
            log(f"search: {h.kind} head, {trials - complete} trial(s) to run ({complete} done), fit on "
                f"{len(y_fit):,} rows, scored on {len(y_val):,} validation images -> {folder}")
        ran, best = 0, (study.best_value if complete else None)
        started = time.time()
        try:
            while complete < trials and (timeout is None or not ran or time.time() - started < timeout):
                trial = study.ask(distributions)
                sampler = "random" if complete < STARTUP else "tpe"
                t0 = time.time()
                try:
                    acc, head = fit_and_score(apply_params(h, trial.params, space), X_fit, y_fit, X_val, y_val,
                                              feature_cells(features))
                except BaseException:
                    study.tell(trial, state=TrialState.FAIL)
                    raise
                seconds = time.time() - t0
                for name, value in (("sampler", sampler), ("seconds", seconds), ("n_fit", int(len(y_fit))),
                                    ("n_val", int(len(y_val))), ("epochs_run", getattr(head, "n_epochs_run_", None))):
                    trial.set_user_attr(name, value)
                study.tell(trial, acc)
                complete, ran = complete + 1, ran + 1
                best = acc if best is None else max(best, acc)
                values = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
                log(f"search: trial {trial.number} ({complete}/{trials}) val {acc:.4f} best {best:.4f} "
                    f"[{sampler}] {values} ({seconds:.1f} s)")
        except BaseException:
            if complete:  # keep what finished readable; the error that stopped the search is what gets reported
                try:
                    _write_outputs(cfg, study, space, folder, key, params, features, seed, subset)
                except Exception:
                    pass
            raise
        _write_outputs(cfg, study, space, folder, key, params, features, seed, subset)
    best_trial = study.best_trial
    return SearchResult(folder, complete, ran, time.time() - start, float(best_trial.value), best_trial.number,
                        dict(best_trial.params))


def best_pipeline(cfg: PipelineConfig, params: dict, space: dict[str, Param]) -> PipelineConfig:
    """The input pipeline with the best trial's head settings (data.path made absolute)."""
    data = cfg.data
    if data.path:
        data = dataclasses.replace(data, path=str(Path(data.path).resolve()))
    best = dataclasses.replace(cfg, data=data, head=apply_params(cfg.head, params, space), name=f"{cfg.name}-search")
    validate(best)
    return best


def _write_outputs(cfg, study, space, folder, key, params, features, seed, subset) -> None:
    from .plots import plot_search

    rows = _trial_rows(study)
    names = list(space)
    _atomic_write(folder / "trials.csv", trials_csv(rows, names))
    best = study.best_trial
    importance = _importance(study, seed)
    plot_search(rows, folder / "search.png.part", importance=importance,
                log_params={n for n, p in space.items() if p.log},
                title=f"kmfeat search: {cfg.head.kind} head on features {features.key}"
                      f"{f', subset {subset:,}' if subset else ''}; best val accuracy {best.value:.4f} "
                      f"(trial {best.number} of {sum(r['state'] == 'COMPLETE' for r in rows)})")
    os.replace(folder / "search.png.part", folder / "search.png")
    n_fit, n_val = best.user_attrs.get("n_fit"), best.user_attrs.get("n_val")
    header = (f"Written by `kmfeat search` ({folder}): the best of {sum(r['state'] == 'COMPLETE' for r in rows)} "
              f"trials,\ntrial {best.number}: validation accuracy {best.value:.4f} on {n_val:,} images, fit on "
              f"{n_fit:,} rows{f' (a class-balanced subset of {subset:,} images)' if subset else ''}.\n"
              f"Searched: {', '.join(f'{k} = {_fmt(v)}' for k, v in best.params.items())}.\n"
              f"Train it: kmfeat train -p {folder / 'best.toml'}")
    _atomic_write(folder / "best.toml", pipeline_toml(best_pipeline(cfg, best.params, space), header))
    _write_manifest(folder, key, params, features,
                    {"trials_complete": sum(r["state"] == "COMPLETE" for r in rows), "best_trial": best.number,
                     "best_val_accuracy": best.value, "best_params": best.params, "importance": importance})


def run_search(cfg: PipelineConfig, store: Store, trials: int, timeout: float | None = None, subset: int = 0,
               seed: int = 0, force: bool = False, quiet: bool = False) -> SearchResult:
    """Resolve (computing if needed) the pipeline's features, then search its head on them."""
    from .runner import Runner

    check_args(trials, timeout, subset, seed)
    search_space(cfg.head)
    start = time.time()
    features = Runner(cfg, store, quiet=quiet).run("encode")
    result = search_features(cfg, features, store, trials, timeout, subset, seed, force,
                             log=(lambda msg: None) if quiet else say)
    result.seconds = time.time() - start
    return result

"""`kmfeat cache ls`: the stage store as a readable table, or JSON for scripts."""
from __future__ import annotations

import json
import time

from .cache import Store
from .memory import human_bytes

SHORT_PARAMS = 70
"""Characters of params shown per row without --long (cut between two params, never inside one)."""


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h" if seconds < 86400 else f"{seconds / 86400:.1f}d"


def _params(params: dict, long: bool) -> str:
    parts = [f"{k}={v}" for k, v in params.items() if v not in ("", [], {}, None)]
    if long:
        return ", ".join(parts)
    out = ""
    for i, part in enumerate(parts):
        candidate = part if not out else f"{out}, {part}"
        if len(candidate) > SHORT_PARAMS:
            return f"{out}, … (+{len(parts) - i} more, --long)" if out else part
        out = candidate
    return out


def rows(store: Store, stage: str | None = None) -> list[dict]:
    """One dict per finished entry and per leftover: stage, key, path, bytes, age_s, status, result, params."""
    now, out = time.time(), []
    for e in store.entries(stage):
        result = e.meta.get("test_accuracy")
        out.append({"stage": e.stage, "key": e.key, "path": str(e.path), "bytes": e.size_bytes(),
                    "age_s": round(now - e.path.stat().st_mtime), "status": "done",
                    "test_accuracy": result, "params": e.params})
    for stage_name, key, path in store.leftovers():
        if stage and stage_name != stage:
            continue
        with store.lock(stage_name, key, blocking=False) as free:
            status = "interrupted" if free else "running"
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        out.append({"stage": stage_name, "key": key, "path": str(path), "bytes": size,
                    "age_s": round(now - path.stat().st_mtime), "status": status, "test_accuracy": None,
                    "params": {}})
    return out


def table(entries: list[dict], long: bool = False) -> str:
    """The rows as aligned text: stage, key, size, age, status (test accuracy of train entries), params."""
    lines = [f"{'stage':<8} {'key':<16} {'size':>9} {'age':>6}  {'status':<12} params"]
    for r in entries:
        status = f"test {r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else r["status"]
        lines.append(f"{r['stage']:<8} {r['key']:<16} {human_bytes(r['bytes']):>9} {_age(r['age_s']):>6}  "
                     f"{status:<12} {_params(r['params'], long)}".rstrip())
    return "\n".join(lines)


def as_json(entries: list[dict]) -> str:
    return json.dumps(entries, indent=2, default=str)

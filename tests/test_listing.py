"""`kmfeat cache ls` (issue 13 item 10): human sizes, whole params, test accuracy, running vs interrupted, JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from kmfeat.cache import Store

ROOT = Path(__file__).resolve().parents[1]


def ls(cache, *args):
    proc = subprocess.run([sys.executable, "-m", "kmfeat", "--cache-dir", str(cache), "cache", "ls", *args],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "KMFEAT_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cache_ls_table_long_and_json(tmp_path):
    store = Store(tmp_path)
    params = {"kind": "mlp", "lr": 0.001, "hidden": 768, **{f"p{i}": i for i in range(20)}}
    with store.lock("train", "0123456789abcdef"):
        w = store.writer("train", "0123456789abcdef", params, {})
        w.save("x", np.zeros(6000, np.float64))  # 49 KB with its header and the manifest: not "0.0MB"
        w.meta["test_accuracy"] = 0.79114
        w.commit()
    store.writer("encode", "aaaaaaaaaaaaaaaa", {}, {}).save("x", np.zeros(3))  # left by a killed run
    busy = store.writer("encode", "bbbbbbbbbbbbbbbb", {}, {})
    busy.save("x", np.zeros(3))
    with store.lock("encode", "bbbbbbbbbbbbbbbb"):  # still being written
        text = ls(tmp_path)
        rows = json.loads(ls(tmp_path, "--json"))
    lines = text.splitlines()
    train = next(line for line in lines if line.startswith("train"))
    assert "49.0 KB" in train and "test 0.7911" in train and "lr=0.001" in train and "--long" in train
    assert len(train) < 160
    assert any("aaaaaaaaaaaaaaaa" in line and "interrupted" in line for line in lines)
    assert any("bbbbbbbbbbbbbbbb" in line and "running" in line for line in lines)
    assert "p19=19" in ls(tmp_path, "--long")
    by_key = {r["key"]: r for r in rows}
    assert by_key["0123456789abcdef"]["test_accuracy"] == 0.79114 and by_key["0123456789abcdef"]["params"] == params
    assert by_key["aaaaaaaaaaaaaaaa"]["status"] == "interrupted" and by_key["bbbbbbbbbbbbbbbb"]["status"] == "running"

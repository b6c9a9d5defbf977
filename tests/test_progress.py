"""Progress in a log is sparse plain lines, on a terminal a bar (issue 13 item 6)."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_image_folder
from kmfeat import progress

ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("interval, lines", [(1e9, (1, 1)), (0.0, (2, 50))])
def test_a_log_gets_whole_lines_at_most_every_interval(monkeypatch, interval, lines):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.delenv("KMFEAT_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "LOG_INTERVAL", interval)
    with progress.bar(total=500, desc="encode train", unit="img") as b:
        for _ in range(50):
            b.update(10)
    text = err.getvalue()
    assert "\r" not in text and text.endswith("\n")
    got = text.splitlines()
    assert lines[0] <= len(got) <= lines[1] and got[-1].startswith("encode train: 100% 500/500 img")


def test_a_terminal_gets_a_bar_and_zero_turns_progress_off(monkeypatch):
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.delenv("KMFEAT_PROGRESS", raising=False)
    assert not progress.as_lines() and not isinstance(progress.bar(range(3)), progress.LogLines)
    monkeypatch.setenv("KMFEAT_PROGRESS", "lines")
    assert isinstance(progress.bar(range(3)), progress.LogLines)
    monkeypatch.setenv("KMFEAT_PROGRESS", "0")
    tty.seek(0)
    tty.truncate()
    assert list(progress.bar(range(3))) == [0, 1, 2] and tty.getvalue() == ""


def test_a_pipeline_log_has_no_carriage_returns(tmp_path):
    data = make_image_folder(tmp_path / "imgs")
    env = {k: v for k, v in os.environ.items() if k != "KMFEAT_PROGRESS"}
    env.update(KMFEAT_CACHE=str(tmp_path / "cache"), KMFEAT_COMPILE="0")
    with open(tmp_path / "log", "w") as log:
        subprocess.run([sys.executable, "-m", "kmfeat", "encode", "--data", str(data), "-o", "patches.n=3000",
                        "-o", "kmeans.k=8", "-o", "data.source=\"imagefolder\""], stderr=log, check=True, cwd=ROOT,
                       env=env)
    text = (tmp_path / "log").read_text()
    assert "\r" not in text and "encode: " in text and len(text) < 4000, text

"""Every command the README shows works as written (issue 13): its shell blocks are read from README.md, the
`.venv/bin/kmfeat` lines run on a tiny image folder (made cheap with overrides appended), and the `make`
lines are checked with `make -n` (they must name real targets and variables). The README cannot drift."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
JPEG = "../shared/data/cifar10-jpeg.tar.gz"
CHEAP = ["-o", "patches.n=3000", "-o", "kmeans.k=8", "-o", "kmeans.iters=3", "-o", "head.epochs=2",
         "-o", "head.hidden=16", "-o", "head.val=6", "-o", "data.source=\"imagefolder\"", "-o", "data.limit_train=0",
         "-o", "data.limit_test=0", "-o", "head.grid={}"]


def shell_lines() -> list[str]:
    """The command lines of the README's shell blocks (``` or ```bash), comments dropped."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang in ("", "bash", "sh"):
            for line in body.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith((".venv/bin/kmfeat", "make ")):
                    lines.append(line)
    return lines


def test_the_readme_has_commands_to_check():
    lines = shell_lines()
    assert sum(line.startswith("make ") for line in lines) >= 3
    assert sum(line.startswith(".venv/bin/kmfeat") for line in lines) >= 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    return make_image_folder(root / "imgs", n_train=8, n_test=2), root / "cache"


def _run(args, cache):
    env = {**os.environ, "KMFEAT_PROGRESS": "0", "KMFEAT_COMPILE": "0", "KMFEAT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "kmfeat", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


@pytest.mark.parametrize("line", [line for line in shell_lines() if line.startswith(".venv/bin/kmfeat")
                                  and "[" not in line])
def test_kmfeat_lines_run(line, tiny, tmp_path):
    data, cache = tiny
    args = [str(data) if a == JPEG else a for a in shlex.split(line)[1:]]
    if "--trials" in args:
        args[args.index("--trials") + 1] = "3"
    args = [str(tmp_path / a) if a.endswith(".npz") else a for a in args]
    if args[0] not in ("cache", "info"):  # what the command reads exists first, as after `make features train`
        pipeline = args[args.index("-p"):args.index("-p") + 2] if "-p" in args else []
        prep = _run(["train", *pipeline, "--data", str(data), *CHEAP], cache)
        assert prep.returncode == 0, prep.stderr
    proc = _run([*args, *CHEAP] if args[0] not in ("cache", "info") or "path" in args else args, cache)
    assert proc.returncode == 0, f"{line}\n{proc.stderr}"


@pytest.mark.parametrize("line", [line for line in shell_lines() if line.startswith("make ")])
def test_make_lines_name_real_targets(line):
    proc = subprocess.run(["make", "-n", *shlex.split(line)[1:]], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"{line}\n{proc.stderr}"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_featurizer_snippet_runs_without_a_convergence_warning():
    """Issue 13: the README's scikit-learn snippet warned (unscaled features); it now has a StandardScaler."""
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning

    (snippet,) = [b for b in python_blocks() if "CoatesFeaturizer(" in b]
    rng = np.random.default_rng(0)
    labels = np.arange(120) % 3
    images = rng.integers(0, 60, (120, 32, 32, 3))
    images[np.arange(120), :, :, labels] += 150
    scope = {"images": images.astype(np.uint8), "labels": labels}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        exec(snippet, scope)
    assert scope["model"].score(scope["images"], labels) > 0.9


def test_the_readme_documents_what_a_new_user_asked_for():
    """Issue 13 item 12: make test-all and clean-cache, memory per stage, KMFEAT_PROGRESS, the machine of each
    result table."""
    text = (ROOT / "README.md").read_text()
    for needed in ("make test-all", "make clean-cache", "KMFEAT_PROGRESS", "Peak memory of each stage",
                   "KMFEAT_MEMORY_AVAILABLE", "2-core AMD EPYC (Zen 4)", "make evaluate", "make export"):
        assert needed in text, needed

"""Pipeline config parsing, overrides and their errors."""
from pathlib import Path

import pytest

from kmfeat import config
from kmfeat.errors import KmfeatError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "pipelines").glob("*.toml")))
def test_shipped_pipelines_parse(name):
    cfg = config.load(ROOT / "pipelines" / name)
    assert cfg.patches.rf >= 1 and cfg.kmeans.k >= 1


def test_cifar10_defaults_are_coates_and_ng():
    cfg = config.load(ROOT / "pipelines/cifar10.toml")
    assert (cfg.patches.rf, cfg.patches.n, cfg.kmeans.k) == (6, 400_000, 1600)
    assert (cfg.encode.kind, cfg.encode.alpha, cfg.encode.split) == ("soft", 0.25, True)
    assert (cfg.encode.stride, cfg.pool.grid, cfg.pool.kind) == (1, 2, "sum")
    assert cfg.whiten.method == "zca" and cfg.whiten.eps == 0.1
    assert cfg.head.kind == "mlp" and cfg.encode.flip_train and cfg.head.power == 0.5
    large = config.load(ROOT / "pipelines/cifar10-large.toml")
    assert large.kmeans.k <= 4000 and large.encode.dtype == "float16"
    assert (large.pool.grid, large.head.bottleneck) == (4, 256)
    paper = config.load(ROOT / "pipelines/coates2011.toml")
    assert paper.head.kind == "svm" and not paper.encode.flip_train
    assert (paper.encode.kind, paper.encode.split, paper.head.power) == ("triangle", False, 1.0)


def test_overrides_and_types(tmp_path):
    path = write(tmp_path, "[kmeans]\nk = 10\n[patches]\nnorm_eps = 10\n")
    cfg = config.load(path, ["kmeans.k=4000", "encode.kind=hard", "data.resize=[28, 30]",
                             "head.params={C = 0.5}", "whiten.eps=1"])
    assert cfg.kmeans.k == 4000
    assert cfg.encode.kind == "hard"
    assert cfg.data.resize == [28, 30]
    assert cfg.head.params == {"C": 0.5}
    assert isinstance(cfg.whiten.eps, float) and cfg.whiten.eps == 1.0
    assert isinstance(cfg.patches.norm_eps, float)
    assert config.load(path, data="/x/y.tar").data.path == "/x/y.tar"


@pytest.mark.parametrize("text,overrides,match", [
    ("[kmeans]\nkk = 3\n", [], r"kmeans\.kk: unknown key; valid keys: k, iters"),
    ("[kmean]\nk = 3\n", [], r"kmean: unknown section; valid sections: data, patches"),
    ("[kmeans]\nk = 'many'\n", [], r"kmeans\.k: got 'many' \(str\), expected int"),
    ("[kmeans]\nk = 2.5\n", [], r"kmeans\.k: got 2.5"),
    ("[encode]\nkind = 'tri'\n", [], r"encode\.kind: got 'tri', expected one of 'triangle', 'hard', 'soft'"),
    ("[encode]\nflip_train = 1\n", [], r"encode\.flip_train: got 1"),
    ("", ["kmeans.k=0"], r"kmeans\.k: got 0, expected >= 1"),
    ("", ["encode.stride=0"], r"encode\.stride: got 0, expected >= 1"),
    ("", ["head.dropout=-0.1"], r"head\.dropout: got -0.1"),
    ("", ["kmeans"], r"-o kmeans: expected section\.key=value"),
    ("", ["kmeans.backend=sklearn"], r"kmeans\.backend: got 'sklearn'"),
    ("", ["data.resize=[32]"], r"data\.resize"),
    ("k = [", [], r"not valid TOML"),
])
def test_errors_name_the_key(tmp_path, text, overrides, match):
    with pytest.raises(KmfeatError, match=match):
        config.load(write(tmp_path, text), overrides)


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(KmfeatError, match="no such file"):
        config.load(tmp_path / "nope.toml")


def test_pyramid_codes_and_power_options():
    cfg = config.load(None, ["pool.grid=[1, 2, 4]", "pool.kind=max", "encode.kind=knn", "encode.q=0.3",
                             "encode.split=true", "encode.dtype=float16", "head.power=0.5", "head.kind=ridge"])
    assert cfg.pool.grid == [1, 2, 4] and cfg.pool.kind == "max"
    assert (cfg.encode.kind, cfg.encode.q, cfg.encode.split, cfg.encode.dtype) == ("knn", 0.3, True, "float16")
    assert cfg.head.power == 0.5 and cfg.head.kind == "ridge"
    assert config.load(None, ["pool.grid=3"]).pool.grid == 3


@pytest.mark.parametrize("override,message", [
    ("pool.grid=[2, 2]", "pool.grid"), ("pool.grid=[0, 1]", "pool.grid"), ("pool.grid=[]", "pool.grid"),
    ('pool.grid="a"', "pool.grid"), ("pool.kind=median", "pool.kind"), ("encode.q=0", "encode.q"),
    ("encode.q=2.5", "encode.q"), ("encode.split=true", "encode.split"), ("head.power=0", "head.power"),
    ("encode.dtype=float64", "encode.dtype")])
def test_new_option_errors_name_the_key(override, message):
    with pytest.raises(KmfeatError, match=message):
        config.load(None, [override])


def test_switching_head_kind_drops_the_files_grid_and_params():
    paper = config.load(ROOT / "pipelines/coates2011.toml", ["head.kind=ridge"])
    assert paper.head.kind == "ridge" and paper.head.grid == {} and paper.head.params == {}
    same = config.load(ROOT / "pipelines/coates2011.toml", ["head.grid.C=[0.1]"])
    assert same.head.kind == "svm" and same.head.grid == {"C": [0.1]}
    svm = config.load(ROOT / "pipelines/cifar10.toml", ["head.kind=svm", "head.grid={C=[0.01]}"])
    assert svm.head.grid == {"C": [0.01]}

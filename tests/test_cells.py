"""head.bottleneck: the MLP's shared per-cell projection, against float64 numpy references."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kmfeat import config
from kmfeat.errors import KmfeatError
from kmfeat.heads.cells import CellProjection
from kmfeat.heads.mlp import MLPHead, build_mlp
from kmfeat.stages import _train_params
from kmfeat.train import feature_cells, make_head


def _np(t):
    return t.detach().double().numpy()


@pytest.mark.parametrize("batch,cells,codes,out", [(5, 3, 7, 4), (1, 16, 11, 9), (4, 21, 3, 2)])
def test_cell_projection_matches_float64_reference(batch, cells, codes, out):
    torch.manual_seed(0)
    proj = CellProjection(cells, codes, out)
    x = torch.randn(batch, cells * codes)
    got = proj(x)
    assert got.shape == (batch, cells * out) and got.dtype == torch.float32
    W, b = _np(proj.proj.weight), _np(proj.proj.bias)
    xs = _np(x).reshape(batch, cells, codes)
    want = np.stack([xs[:, c] @ W.T + b for c in range(cells)], axis=1).reshape(batch, -1)
    np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-5)


def test_bottleneck_mlp_forward_matches_float64_reference():
    torch.manual_seed(1)
    cells, codes, d, hidden, n_out = 4, 13, 5, 6, 3
    model = build_mlp(cells * codes, hidden, n_out, 0.5, 0.1, cells, d).eval()
    x = torch.randn(7, cells * codes)
    proj, lin1, lin2 = model[1].proj, model[2], model[5]
    z = (_np(x).reshape(7, cells, codes) @ _np(proj.weight).T + _np(proj.bias)).reshape(7, -1)
    h = np.maximum(z @ _np(lin1.weight).T + _np(lin1.bias), 0)
    want = h @ _np(lin2.weight).T + _np(lin2.bias)
    np.testing.assert_allclose(_np(model(x)), want, rtol=1e-5, atol=1e-5)
    plain = build_mlp(cells * codes, hidden, n_out, 0.5, 0.0)
    assert not any(isinstance(m, CellProjection) for m in plain)


def test_bottleneck_head_fits_saves_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 4 * 6)) * 2
    y = rng.integers(0, 3, 240)
    X = (centers[y] + rng.normal(size=(240, 24))).astype(np.float32)
    head = MLPHead(hidden=16, bottleneck=4, cells=4, epochs=60, lr=1e-2, batch=32, device="cpu", precision="fp32")
    head.fit(X[:200], y[:200], X[200:], y[200:])
    assert isinstance(head.model_[1], CellProjection) and head.model_[1].proj.weight.shape == (4, 6)
    assert (head.predict(X[200:]) == y[200:]).mean() > 0.8
    head.save(tmp_path / "m.pt")
    back = MLPHead.load(tmp_path / "m.pt")
    assert (back.bottleneck, back.cells) == (4, 4)
    np.testing.assert_array_equal(back.predict_proba(X), head.predict_proba(X))


def test_bottleneck_needs_equal_cells():
    X, y = np.zeros((10, 28), np.float32), np.arange(10) % 2
    with pytest.raises(KmfeatError, match="28 features do not split into 5"):
        MLPHead(bottleneck=3, cells=5, epochs=1, device="cpu").fit(X, y)
    with pytest.raises(KmfeatError, match="head.bottleneck"):
        MLPHead(bottleneck=-1, device="cpu").fit(X, y)


def test_cells_come_from_the_encode_grid():
    assert feature_cells(SimpleNamespace(params={"grid": 4})) == 16
    assert feature_cells(SimpleNamespace(params={"grid": [1, 2, 4]})) == 21
    h = config.PipelineConfig().head
    h.bottleneck = 8
    head = make_head(h, cells=16)
    assert (head.bottleneck, head.cells) == (8, 16)


def test_bottleneck_in_the_train_key_only_when_set(tmp_path):
    cfg = config.PipelineConfig()
    assert "bottleneck" not in _train_params(cfg)  # the plain MLP keeps its old keys
    cfg.head.bottleneck = 256
    assert _train_params(cfg)["bottleneck"] == 256
    cfg.head.kind = "svm"
    assert "bottleneck" not in _train_params(cfg)
    path = tmp_path / "p.toml"
    path.write_text("[head]\nbottleneck = -2\n")
    with pytest.raises(KmfeatError, match="head.bottleneck"):
        config.load(path)

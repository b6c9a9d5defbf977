"""Dropout MLP head in torch: standardize -> Linear -> ReLU -> Dropout -> Linear, early-stopped on a val split."""
import copy
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from kmfeat.errors import KmfeatError
from kmfeat.heads.cells import CellProjection
from kmfeat.heads.common import (Standardizer, check_fit_data, chunk_rows, load_torch_blob, row_chunks,
                                 standardizer_from_state, standardizer_state)
from kmfeat.memory import parse_size
from kmfeat.memory import ram_available as available_memory  # RAM only: the budget must not count swap
from kmfeat.precision import full_fp32, native_bf16
from kmfeat.progress import bar, say
from kmfeat.rows import as_rows

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "none")
PRECISIONS = ("auto", "fp32", "bf16")
EVAL_BATCH = 4096
RAM_SHARE = 0.25
RAM_CAP = 4 << 30
"""The standardized training matrix is held in RAM when it takes at most RAM_SHARE of the available memory
(MemAvailable) and at most RAM_CAP bytes; larger ones are streamed from the (memory-mapped) features batch by
batch. The cap keeps `kmfeat train` at k = 8000 with mirrors (90,000 x 32,000: 5.8 GB even in bf16, 7.8 GB peak
RSS in all when held, 3.6 GB streamed) streaming on any machine, while k = 4000 (2.9 GB in bf16) still trains in RAM."""
RAM_BUDGET_ENV = "KMFEAT_MLP_RAM_BUDGET"
"""Environment variable that replaces the RAM_SHARE rule: a size in bytes (suffix K, M or G allowed; 0 = always
stream), for `kmfeat train` runs where head.params cannot reach MLPHead.ram_budget."""
BLOCK_BYTES = 256 << 20
"""A streamed epoch reads its shuffled rows in blocks of about this many float32 bytes."""


def resolve_device(device: str) -> torch.device:
    """The torch device for head.device: auto = cuda if available, else cpu; cpu uses every core we may run on."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise KmfeatError(f"head.device: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KmfeatError(f"head.device: {device!r} asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise KmfeatError(f"head.device: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    return dev


CHECKPOINT_FORMAT = "kmfeat.MLPHead.checkpoint/1"
CHECKPOINT_COST_RATIO = 50
"""A checkpoint is written once this many times its own writing time has passed since the previous one: at most
2% of the training time goes to checkpoints (the default head's state is ~160 MB, fsynced)."""


def save_checkpoint(path, state: dict) -> None:
    """torch.save to a temp file, fsynced, then renamed over `path`: a kill leaves the previous epoch's."""
    path = os.fspath(path)
    part = path + ".part"
    with open(part, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def load_checkpoint(path, identity: dict) -> dict | None:
    """The checkpoint at `path` if it was written by a fit with this identity, else None (a missing, damaged or
    foreign file is ignored: the fit starts over)."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception:
        return None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT or saved.get("identity") != identity:
        return None
    return saved


def ram_budget(explicit) -> float:
    """The RAM the in-memory training matrix may take: `explicit` when given, else $KMFEAT_MLP_RAM_BUDGET,
    else RAM_SHARE of MemAvailable, at most RAM_CAP."""
    if explicit is not None:
        return float(explicit)
    env = os.environ.get(RAM_BUDGET_ENV)
    if env is not None and env.strip():
        return float(parse_size(env, RAM_BUDGET_ENV, "4G, 512M or 0"))
    available = available_memory()
    return RAM_CAP if available is None else min(RAM_SHARE * available, RAM_CAP)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier for 0-based `epoch`: cosine to 0, x0.1 steps at 50%/75%, or constant."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return 0.1 ** ((epoch >= 0.5 * epochs) + (epoch >= 0.75 * epochs))
    return 1.0


def build_mlp(n_in: int, hidden: int, n_out: int, dropout: float, input_dropout: float, cells: int = 1,
              bottleneck: int = 0) -> nn.Sequential:
    """Dropout(input) -> Linear -> ReLU -> Dropout -> Linear (dropouts with p=0 are identities); with a
    bottleneck, the input is first cut into `cells` pooled cells whose codes share one linear projection
    (kmfeat.heads.cells.CellProjection), and the hidden layer sees the cells' projections side by side."""
    if bottleneck:
        first = [CellProjection(cells, n_in // cells, bottleneck), nn.Linear(cells * bottleneck, hidden)]
    else:
        first = [nn.Linear(n_in, hidden)]
    return nn.Sequential(nn.Dropout(input_dropout), *first, nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


class MLPHead(ClassifierMixin, BaseEstimator):
    """Standardize -> Linear -> ReLU -> Dropout(p) -> Linear, in torch, with early stopping on a validation set.
    With bottleneck > 0 the first Linear is preceded by one projection of each of the `cells` pooled cells' codes
    to `bottleneck` values, shared by the cells (kmfeat.heads.cells.CellProjection: a head that sees space).

    Epochs are numbered from 1 in `history_` and `best_epoch_`. precision="bf16" trains under bfloat16 autocast
    (weights and optimizer state stay float32, the standardized training matrix is held in bfloat16); "auto" picks
    bf16 where the device does it in hardware, else fp32 (the choice is kept in `precision_`). Evaluation and
    prediction always run in float32.

    Big training sets are streamed: when the standardized training matrix (N x F in bf16 or float32) is larger
    than `ram_budget` bytes (None: $KMFEAT_MLP_RAM_BUDGET if set, else RAM_SHARE = 25% of MemAvailable at fit
    time but at most RAM_CAP = 4 GiB; 0: always stream), it is never built. Each epoch then reads its shuffled
    rows block by block (about BLOCK_BYTES, a multiple of `batch` rows, sorted within the block so every file is
    read front to back) from X, which may be a memmap or a kmfeat.rows.Rows view (float16 is fine),
    standardizes the block and trains on its mini-batches; the next block is read in a
    background thread meanwhile. The epoch's permutation, the batches and the values in them are the same as
    in RAM, so on the CPU both ways train the same model (`streamed_` says which one ran). On a GPU the
    in-memory matrix is shuffled there with the GPU's generator, so results differ from the streamed
    (CPU-shuffled) run as they would between any two devices.
    """

    def __init__(self, hidden=512, dropout=0.5, epochs=40, batch=256, lr=1e-3, weight_decay=1e-4,
                 optimizer="adamw", schedule="cosine", patience=8, seed=0, device="auto", input_dropout=0.0,
                 label_smoothing=0.0, precision="auto", power=1.0, ram_budget=None, bottleneck=0, cells=1):
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.batch = batch
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.schedule = schedule
        self.patience = patience
        self.seed = seed
        self.device = device
        self.input_dropout = input_dropout
        self.label_smoothing = label_smoothing
        self.precision = precision
        self.power = power
        self.ram_budget = ram_budget
        self.bottleneck = bottleneck
        self.cells = cells

    def _check_params(self) -> None:
        checks = [
            ("hidden", _is_int(self.hidden) and self.hidden >= 1, "an integer >= 1"),
            ("dropout", _is_real(self.dropout) and 0 <= self.dropout < 1, "a number in [0, 1)"),
            ("input_dropout", _is_real(self.input_dropout) and 0 <= self.input_dropout < 1, "a number in [0, 1)"),
            ("epochs", _is_int(self.epochs) and self.epochs >= 1, "an integer >= 1"),
            ("batch", _is_int(self.batch) and self.batch >= 1, "an integer >= 1"),
            ("lr", _is_real(self.lr) and self.lr > 0, "a number > 0"),
            ("weight_decay", _is_real(self.weight_decay) and self.weight_decay >= 0, "a number >= 0"),
            ("optimizer", self.optimizer in OPTIMIZERS, "one of " + ", ".join(OPTIMIZERS)),
            ("schedule", self.schedule in SCHEDULES, "one of " + ", ".join(SCHEDULES)),
            ("patience", self.patience is None or (_is_int(self.patience) and self.patience >= 1),
             "an integer >= 1 (or none to never stop early)"),
            ("seed", _is_int(self.seed), "an integer"),
            ("label_smoothing", _is_real(self.label_smoothing) and 0 <= self.label_smoothing < 1,
             "a number in [0, 1)"),
            ("precision", self.precision in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
            ("bottleneck", _is_int(self.bottleneck) and self.bottleneck >= 0, "an integer >= 0 (0: none)"),
            ("cells", _is_int(self.cells) and self.cells >= 1, "an integer >= 1"),
            ("ram_budget", self.ram_budget is None or (_is_real(self.ram_budget) and self.ram_budget >= 0),
             "a number of bytes >= 0 (or none: a quarter of the available memory)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise KmfeatError(f"head.{name}: expected {expected}, got {getattr(self, name)!r}")

    def _label_indices(self, y, name: str) -> np.ndarray:
        y = np.asarray(y)
        idx = np.searchsorted(self.classes_, y)
        idx = np.minimum(idx, len(self.classes_) - 1)
        unknown = self.classes_[idx] != y
        if unknown.any():
            raise KmfeatError(f"{name}: label {y[unknown][0]!r} does not occur in the training labels")
        return idx.astype(np.int64)

    def _make_optimizer(self, params):
        """AdamW or Nesterov SGD, fused kernels where this torch build has them (several times faster on CPU)."""
        cls, extra = (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}) if self.optimizer == "sgd" \
            else (torch.optim.AdamW, {})
        params = list(params)
        try:
            return cls(params, lr=self.lr, weight_decay=self.weight_decay, fused=True, **extra)
        except (RuntimeError, TypeError, ValueError):
            return cls(params, lr=self.lr, weight_decay=self.weight_decay, **extra)

    def fit(self, X, y, X_val=None, y_val=None, checkpoint=None):
        """Trains on (X, y); picks the best epoch by validation accuracy (early stopping with `patience`) and restores
        those weights. No validation set -> trains all epochs and keeps the last. The model never sees the test set.
        checkpoint: a file path; the state at the end of an epoch is saved there (weights, optimizer, both random
        generators, history, best weights) after the first epoch and then as often as costs at most 2% of the
        time (CHECKPOINT_COST_RATIO), and a fit that finds one made by the same fit resumes after that epoch,
        ending with the same weights as an uninterrupted fit.
        learned: standardizer_, model_ (torch nn.Module, eval mode, on CPU), classes_, history_ (list of per-epoch dicts
        {epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds}), best_epoch_, n_epochs_run_."""
        self._check_params()
        has_val = check_fit_data(X, y, X_val, y_val)
        dev = resolve_device(self.device)
        self.classes_ = np.unique(np.asarray(y))
        self.precision_ = self.precision if self.precision != "auto" else ("bf16" if native_bf16(dev) else "fp32")
        self.n_features_in_ = X.shape[1]
        if self.bottleneck and X.shape[1] % self.cells:
            raise KmfeatError(f"head.bottleneck: the {X.shape[1]} features do not split into {self.cells} pooled "
                              f"cells of equal size (cells comes from pool.grid)")

        X = as_rows(X)  # float32 reads that drop the pages of a memmap as they go
        self.standardizer_ = Standardizer(power=self.power).fit(X)
        dtype = torch.bfloat16 if self.precision_ == "bf16" else torch.float32
        where = self._placement(X.shape, dtype, dev)
        self.streamed_ = where is None
        Xt = None if self.streamed_ else self._standardized_matrix(X, dtype, where)
        if self.streamed_:
            gib = X.shape[0] * X.shape[1] * dtype.itemsize / 2**30
            say(f"mlp: streaming the {gib:.1f} GiB training matrix from the features (over the RAM budget)")
        yt = torch.from_numpy(self._label_indices(y, "train labels")).to(where or "cpu")
        if has_val:
            Xv = torch.from_numpy(self.standardizer_.transform(X_val))
            yv = torch.from_numpy(self._label_indices(y_val, "validation labels"))

        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(self.seed)
            model = build_mlp(X.shape[1], self.hidden, len(self.classes_), self.dropout, self.input_dropout,
                              self.cells, self.bottleneck).to(dev)
            with full_fp32(dev):  # float32 parts (all of them in fp32 precision) without TF32
                self._train(model, Xt, X, yt, Xv if has_val else None, yv if has_val else None, dev, dtype,
                            checkpoint)
        return self

    def _placement(self, shape, dtype, dev: torch.device) -> torch.device | None:
        """Where the whole standardized training matrix goes: the GPU when it fits comfortably there, else
        RAM when it is within the budget (see ram_budget()); None: stream it."""
        nbytes = shape[0] * shape[1] * dtype.itemsize
        if dev.type == "cuda" and nbytes < 0.6 * torch.cuda.mem_get_info(dev)[0]:
            return dev
        return torch.device("cpu") if nbytes <= ram_budget(self.ram_budget) else None

    def _standardized_matrix(self, X, dtype: torch.dtype, where: torch.device) -> torch.Tensor:
        """The standardized training matrix in `dtype` on `where`, filled chunk by chunk (float32 chunks are
        standardized, then rounded to `dtype`), so no float32 copy of the whole of X is ever made."""
        n, f = X.shape
        out = torch.empty((n, f), dtype=dtype, device=where)
        for a, b in row_chunks(n, chunk_rows(f)):
            block = X.take(np.arange(a, b))
            out[a:b] = torch.from_numpy(self.standardizer_.transform_inplace(block))
        return out

    def _read_block(self, X, idx: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """Rows idx of X (in that order), standardized, as a CPU tensor in `dtype`: the values the in-memory
        matrix holds for them."""
        block = X.take(idx)
        t = torch.from_numpy(self.standardizer_.transform_inplace(block))
        return t if dtype == torch.float32 else t.to(dtype)

    def _block_rows(self, n: int, n_features: int) -> int:
        """Rows per streamed block: about BLOCK_BYTES of float32, a whole number of batches."""
        rows = max(1, BLOCK_BYTES // max(1, 4 * n_features)) // self.batch * self.batch
        return min(max(rows, self.batch), n)

    def _batches(self, Xt, X, perm: torch.Tensor, dtype: torch.dtype, buf, pool):
        """Yield (features, indices) of the epoch's mini-batches, in the order of `perm`."""
        n = perm.shape[0]
        if Xt is not None:
            for start in range(0, n, self.batch):
                idx = perm[start:start + self.batch]
                yield torch.index_select(Xt, 0, idx, out=buf[:len(idx)]), idx
            return
        perm_np = perm.numpy()
        size = self._block_rows(n, X.shape[1])
        starts = list(range(0, n, size))
        pending = pool.submit(self._read_block, X, perm_np[:size], dtype)
        for i, start in enumerate(starts):
            block = pending.result()
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                pending = pool.submit(self._read_block, X, perm_np[nxt:nxt + size], dtype)
            for a in range(0, len(block), self.batch):
                yield block[a:a + self.batch], perm[start + a:start + a + self.batch]
            del block

    def _train(self, model, Xt, X, yt, Xv, yv, dev, dtype, checkpoint=None) -> None:
        """The epochs: mini-batches from the in-memory matrix Xt or, when Xt is None, streamed from X."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kmfeat-mlp-read") as pool:
            self._epochs(model, Xt, X, yt, Xv, yv, dev, dtype, pool, checkpoint)

    def _fit_identity(self, X, dev) -> dict:
        """What a checkpoint must match to be resumed: this fit's params, data shape, classes and device."""
        return {"params": {k: v for k, v in self.get_params().items() if k != "ram_budget"},
                "shape": list(X.shape), "classes": self.classes_.tolist(), "device": dev.type,
                "precision": self.precision_, "streamed": self.streamed_}

    def _epochs(self, model, Xt, X, yt, Xv, yv, dev, dtype, pool, checkpoint=None) -> None:
        opt = self._make_optimizer(model.parameters())
        loss_fn = nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)
        home = Xt.device if Xt is not None else torch.device("cpu")
        gen = torch.Generator().manual_seed(self.seed)  # on CPU: the same shuffles wherever the matrix lives
        n = X.shape[0]
        buf = None if Xt is None else torch.empty((min(self.batch, n), Xt.shape[1]), dtype=dtype, device=home)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.precision_ == "bf16")
        self.history_, best_acc, best_state, self.best_epoch_ = [], -1.0, None, None
        identity, start = self._fit_identity(X, dev), 0
        saved = load_checkpoint(checkpoint, identity)
        if saved is not None:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            gen.set_state(saved["shuffle_rng"])
            torch.set_rng_state(saved["torch_rng"])
            if dev.type == "cuda" and saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(saved["cuda_rng"], dev)
            self.history_, best_acc, best_state = saved["history"], saved["best_acc"], saved["best_state"]
            self.best_epoch_, start = saved["best_epoch"], len(saved["history"])
            say(f"mlp: resuming after epoch {start} of {self.epochs} (checkpoint {checkpoint})")
        epochs = bar(range(start, self.epochs), desc="mlp", unit="epoch", initial=start, total=self.epochs)
        saved_at, save_seconds = time.perf_counter(), 0.0  # the first checkpoint comes after the first epoch
        for epoch in epochs:
            t0 = time.perf_counter()
            lr = self.lr * lr_factor(self.schedule, epoch, self.epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            perm = torch.randperm(n, generator=gen).to(home)
            for xb, idx in self._batches(Xt, X, perm, dtype, buf, pool):
                xb = xb.to(dev, non_blocking=True)
                yb = yt[idx].to(dev, non_blocking=True)
                with autocast:
                    logits = model(xb)
                    loss = loss_fn(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == yb).sum()
            row = {"epoch": epoch + 1, "train_loss": float(loss_sum) / n, "train_acc": float(correct) / n,
                   "val_loss": None, "val_acc": None, "lr": lr}
            if Xv is not None:
                row["val_loss"], row["val_acc"] = self._evaluate(model, Xv, yv, loss_fn, dev)
                if row["val_acc"] > best_acc:
                    best_acc, self.best_epoch_ = row["val_acc"], epoch + 1
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            row["seconds"] = time.perf_counter() - t0
            self.history_.append(row)
            epochs.set_postfix({k: round(row[k], 4) for k in ("train_loss", "train_acc", "val_acc")
                                if row[k] is not None})
            stop = Xv is not None and self.patience is not None and epoch + 1 - self.best_epoch_ >= self.patience
            due = time.perf_counter() - saved_at >= CHECKPOINT_COST_RATIO * save_seconds
            if checkpoint is not None and not stop and epoch + 1 < self.epochs and due:
                saved_at = time.perf_counter()
                save_checkpoint(checkpoint, {
                    "identity": identity, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "shuffle_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                    "history": self.history_, "best_acc": best_acc, "best_state": best_state,
                    "best_epoch": self.best_epoch_})
                save_seconds = time.perf_counter() - saved_at
            if stop:
                break
        self.n_epochs_run_ = len(self.history_)
        if best_state is None:
            self.best_epoch_ = self.n_epochs_run_
        else:
            model.load_state_dict(best_state)
        self.model_ = model.to("cpu").eval()

    @staticmethod
    @torch.no_grad()
    def _evaluate(model, Xv, yv, loss_fn, dev) -> tuple[float, float]:
        model.eval()
        loss_sum, correct = 0.0, 0
        for a, b in row_chunks(Xv.shape[0], EVAL_BATCH):
            logits = model(Xv[a:b].to(dev))
            yb = yv[a:b].to(dev)
            loss_sum += float(loss_fn(logits, yb)) * (b - a)
            correct += int((logits.argmax(1) == yb).sum())
        return loss_sum / Xv.shape[0], correct / Xv.shape[0]

    @torch.no_grad()
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (N, n_classes), float32, in eval mode (dropout off), batched so a memmap is fine."""
        dev = resolve_device(self.device)
        model = self.model_ if dev.type == "cpu" else copy.deepcopy(self.model_).to(dev)
        model.eval()
        out = np.empty((X.shape[0], len(self.classes_)), np.float32)
        self.standardizer_._check_width(X)
        for a, b in row_chunks(X.shape[0], chunk_rows(X.shape[1], 4, EVAL_BATCH)):
            xb = torch.from_numpy(self.standardizer_.transform(X[a:b])).to(dev)
            out[a:b] = torch.softmax(model(xb), dim=1).cpu().numpy()
        return out

    def predict(self, X) -> np.ndarray:
        """Predicted labels (values from classes_)."""
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def save(self, path) -> None:
        """torch.save of params, weights, standardizer arrays, classes and training history."""
        torch.save({
            "format": "kmfeat.MLPHead/1",
            "params": self.get_params(),
            "state_dict": self.model_.state_dict(),
            **standardizer_state(self.standardizer_),
            "classes": torch.from_numpy(np.asarray(self.classes_)),
            "history": self.history_,
            "best_epoch": self.best_epoch_,
            "n_epochs_run": self.n_epochs_run_,
            "precision": self.precision_,
        }, path)

    @classmethod
    def load(cls, path) -> "MLPHead":
        """Rebuild a fitted MLPHead written by save() (weights only: no pickled code is run)."""
        blob = load_torch_blob(path, "kmfeat.MLPHead/1")
        head = cls(**blob["params"])
        std = standardizer_from_state(blob)
        head.standardizer_, head.n_features_in_ = std, std.n_features_in_
        head.classes_ = blob["classes"].numpy()
        head.model_ = build_mlp(head.n_features_in_, head.hidden, len(head.classes_), head.dropout, head.input_dropout,
                                head.cells, head.bottleneck)
        head.model_.load_state_dict(blob["state_dict"])
        head.model_.eval()
        head.history_, head.best_epoch_, head.n_epochs_run_ = blob["history"], blob["best_epoch"], blob["n_epochs_run"]
        head.precision_ = blob["precision"]
        return head

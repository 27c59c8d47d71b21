"""Training log: learning curves sampled several times per epoch and how fast each layer's weights move.

A TrainingLogger takes the progress reports of both protocols the workspace's estimators speak (each kind's build
attaches it, utils.kinds):
* skorch's callback events with the net (the MLP and CNN: on_train_begin, on_batch_end, on_epoch_end);
* the hook ``log(clf, info)`` (the compartmental network's hook and hook_every): `info` holds examples_seen, epoch,
  n_train and the batch's train_loss and train_acc (and bp_angle); `clf` answers named_weights() and predict_proba().

    from utils.logger import TrainingLogger
    log = TrainingLogger(X_valid, y_valid, records_per_epoch=10, name="mlp-mnist-s0")
    clf = make_classifier("mlp", logger=log, max_epochs=5).fit(X, y)
    log.to_frame()                                   # tidy pandas table, one row per record x weight matrix
    log.save("runs/mlp-mnist-s0", config={"model": "mlp", "dataset": "mnist", "seed": 0, **hyperparameters})
    # read back, combine and split the tables with utils.runs: load_run, concat_runs, curves, weights, angles

A record is taken before the first update (examples_seen = 0; its change columns are NaN) and at the first batch
that reaches each multiple of n_train / records_per_epoch examples (`_due`, the one rule of both protocols). It
holds the examples seen, the wall time, the training loss and accuracy (mean over the batches since the previous
record, from the forward pass before each update), the validation loss and accuracy (on a fixed, class-balanced
subset of at most `max_valid` validation examples) and, for every weight matrix or kernel (ndim >= 2), its norm
||W_t||, its change ||W_t - W_(t-1)|| and the relative change ||W_t - W_(t-1)|| / ||W_t||. Hidden layers' angles to
the backprop update (degrees): the compartmental network's own diagnostic (mean over the hook calls since the
previous record), and for the MLP and CNN utils.rules.hidden_angles on the record's training batch (0 for backprop,
not computed; two extra passes of ANGLE_EXAMPLES examples per record for the other rules). The table (`to_frame`,
records.csv): one row per record and weight matrix, plus one per record and hidden layer with an angle; its layout
and readers are utils/runs.py's.
"""
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from skorch.callbacks import Callback

from utils.data import stratified_indices
from utils.io import library_versions
from utils.rules import hidden_angles
from utils.runs import curves, records_frame, save_run

OVERHEAD_WARNING = 0.15  # warn once per log when the logger's time exceeds this fraction of the training time
#                          (not counting the first record's validation, which carries one-time costs: compilation)
OVERHEAD_MIN_SECONDS = 1.0  # ... and this many seconds: less is not worth a warning, whatever the fraction (toy runs)
ANGLE_EXAMPLES = 32  # a rule's angle to backprop: on this many examples of the last training batch (two extra
#                      passes each record; their cost: docs/results.md, "Measurements moved from the code")


class LoggerOverheadWarning(UserWarning):
    """The logger takes a large share of the training time (validation set or record frequency too large)."""


def _nan():
    return float("nan")


class TrainingLogger(Callback):
    """Records training several times per epoch; a skorch callback and a hook `logger(clf, info)` at once.

    Parameters
    ----------
    X_valid, y_valid : tensors (or arrays), optional
        Validation data. Without them the validation columns are NaN.
    records_per_epoch : int
        Records per pass over the training data (default 10), evenly spaced in examples; the last one of an epoch
        falls on its last batch. A record is taken at the first batch that reaches each mark (`_due`).
    max_valid : int or None
        Validation metrics use a fixed, class-balanced random subset (seed 0) of at most this many validation
        examples (None: all). The validation passes are the logger's main cost, in proportion to
        records_per_epoch x n_valid / n_train (docs/results.md, "Measurements moved from the code").
    name : str, optional
        The run's name: the `run` column of the table.

    Constructor arguments are kept as given (sklearn's `clone` of an estimator clones its logger too: a cloned
    estimator logs into the clone, not into this object). State lives in attributes ending in "_".
    """

    def __init__(self, X_valid=None, y_valid=None, records_per_epoch=10, max_valid=300, name=None):
        self.X_valid = X_valid
        self.y_valid = y_valid
        self.records_per_epoch = records_per_epoch
        self.max_valid = max_valid
        self.name = name
        self.initialize()

    # ------------------------------------------------------------------------------------------------------------
    # state

    def initialize(self):
        """Forget every record (skorch calls this when a fit (re)initializes the net)."""
        if self.records_per_epoch is None or int(self.records_per_epoch) < 1:
            raise ValueError(f"records_per_epoch must be a positive integer, got {self.records_per_epoch!r}")
        if (self.X_valid is None) != (self.y_valid is None):
            raise ValueError("give both X_valid and y_valid, or neither")
        self.records_ = []
        self.prev_weights_ = None     # detached clones of the weights at the previous record
        self.examples_seen_ = 0       # cumulative over everything this logger saw since initialize()
        self.offset_ = 0              # examples seen before the current fit (partial_fit / warm start continue)
        self.epoch_ = 0
        self.t0_ = None
        self.elapsed_before_ = 0.0    # wall time of earlier fits (continued runs)
        self.logger_time_ = 0.0       # seconds spent inside the logger
        self.device_ = None
        self.n_train_ = None
        self.valid_ = None            # (X subset, y subset) cached on the estimator's device
        self.warned_ = False
        self.warmup_time_ = 0.0       # the first record's validation: one-time costs (torch.compile, lazy set-up)
        self.batch_ = None            # the last training batch: the data of the MLP's and CNN's angle diagnostic
        self.hook_seen_ = 0           # the hook path: examples_seen of the hook's previous call in this fit
        self._reset_window()
        self._reset_marks()
        return self

    def reset(self):
        """Forget every record; the next fit starts a new log."""
        return self.initialize()

    def _reset_window(self):
        # sums over the training batches since the last record (tensors on the skorch path: no per-batch sync)
        self.win_loss_ = 0.0
        self.win_correct_ = 0.0
        self.win_n_ = 0
        self.win_angle_ = {}
        self.win_angle_n_ = 0

    def _reset_marks(self):
        self.pos_ = 0                 # examples counted since the marks' origin (see _due)
        self.mark_ = 0                # marks recorded since that origin

    def _count(self, n, loss_sum, correct, angles=None):
        """Add n training examples (a batch, or the hook's examples since its previous call) to the window: their
        summed loss and correct predictions, and the hook's backprop angles (averaged over its calls)."""
        self.win_loss_ = self.win_loss_ + loss_sum
        self.win_correct_ = self.win_correct_ + correct
        self.win_n_ += n
        self.examples_seen_ += n
        self.pos_ += n
        for layer, angle in (angles or {}).items():
            self.win_angle_[layer] = self.win_angle_.get(layer, 0.0) + float(angle)
        self.win_angle_n_ += bool(angles)

    def _due(self):
        """Whether a record is due after the examples counted so far: the one recording rule of both paths.

        Marks lie at every multiple of n_train / records_per_epoch examples; a record is due at the first batch (or
        hook call) that reaches a mark not yet recorded, one record however many marks it passes. The origin is
        each epoch's start on the skorch path (an epoch may end early: drop_last; its end gets a record of its own)
        and the fit's start on the hook path, whose epochs are n_train examples each: the same marks.
        """
        if not self.n_train_:
            return False
        mark = self.pos_ * int(self.records_per_epoch) // int(self.n_train_)
        if mark <= self.mark_:
            return False
        self.mark_ = mark
        return True

    # ------------------------------------------------------------------------------------------------------------
    # skorch callback side

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        t = time.perf_counter()
        self._begin_fit(self._skorch_weights(net))
        self.t0_ = time.perf_counter()
        if not self.records_:
            self._record(self._skorch_weights(net), valid=lambda Xv: self._skorch_proba(net, Xv),
                         device=net.device)
        self.logger_time_ += time.perf_counter() - t

    def on_epoch_begin(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        try:
            self.n_train_ = len(dataset_train)
        except TypeError:
            self.n_train_ = None
        self._reset_marks()

    def on_batch_end(self, net, batch=None, training=None, loss=None, y_pred=None, **kwargs):
        if not training:
            return
        t = time.perf_counter()
        yb = batch[1] if isinstance(batch, (tuple, list)) else None
        n = len(yb) if yb is not None else (len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch))
        correct = _nan()
        if y_pred is not None and yb is not None:
            y_pred = y_pred[0] if isinstance(y_pred, (tuple, list)) else y_pred
            yb = torch.as_tensor(yb).to(y_pred.device)
            correct = (y_pred.detach().argmax(1) == yb).sum()   # tensors: no device sync per batch
        self._count(n, loss.detach() * n if loss is not None else 0.0, correct)
        self.batch_ = (batch[0], yb) if isinstance(batch, (tuple, list)) else None
        if self._due():
            self._record(self._skorch_weights(net), valid=lambda Xv: self._skorch_proba(net, Xv),
                         device=net.device, angles=self._skorch_angles(net))
        self.logger_time_ += time.perf_counter() - t

    def on_epoch_end(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        # an epoch that ended off a mark (drop_last, an iterator shorter than the dataset) still gets its record
        t = time.perf_counter()
        if self.win_n_ > 0:
            self._record(self._skorch_weights(net), valid=lambda Xv: self._skorch_proba(net, Xv),
                         device=net.device, angles=self._skorch_angles(net))
        self.epoch_ += 1
        self.logger_time_ += time.perf_counter() - t

    @staticmethod
    def _skorch_weights(net):
        return {n: p for n, p in net.module_.named_parameters() if p.ndim >= 2}

    def _skorch_angles(self, net):
        """Each hidden layer's angle between the net's rule and backprop on the first ANGLE_EXAMPLES examples of the
        last training batch (None: no batch with labels, or a module without utils.rules layers)."""
        Xb, yb = self.batch_ or (None, None)
        if yb is None or not isinstance(Xb, torch.Tensor):
            return None
        Xb, yb = Xb[:ANGLE_EXAMPLES].to(net.device), torch.as_tensor(yb)[:ANGLE_EXAMPLES].to(net.device)
        return hidden_angles(net.module_, Xb, yb, net.criterion_, skip_backprop=True) or None

    @staticmethod
    def _skorch_proba(net, Xv):
        module = net.module_
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = net.infer(Xv)
                out = out[0] if isinstance(out, tuple) else out
                nonlin = net._get_predict_nonlinearity() if hasattr(net, "_get_predict_nonlinearity") else None
                return nonlin(out) if nonlin is not None else torch.softmax(out, dim=1)
        finally:
            module.train(was_training)

    # ------------------------------------------------------------------------------------------------------------
    # compartmental hook side: hook(clf, info)

    def __call__(self, clf, info):
        t = time.perf_counter()
        seen = int(info.get("examples_seen", 0))
        if seen == 0:  # a fit starts
            self._begin_fit(self._hook_weights(clf))
            self.n_train_ = info.get("n_train") or None
            self.t0_ = time.perf_counter()
            if not self.records_:
                self.epoch_ = int(info.get("epoch", 0))
                self._record(self._hook_weights(clf), valid=clf.predict_proba, angles=info.get("bp_angle"))
            self.logger_time_ += time.perf_counter() - t
            return
        if self.t0_ is None:  # a hook called without the examples_seen=0 call: start the clock now
            self.t0_ = time.perf_counter()
        self.n_train_ = info.get("n_train") or self.n_train_
        n, self.hook_seen_ = seen - self.hook_seen_, seen
        if n > 0:  # the batch's means stand for the examples since the previous call (all of them: hook_every=None)
            self._count(n, float(info.get("train_loss", _nan())) * n, float(info.get("train_acc", _nan())) * n,
                        info.get("bp_angle"))
        self.epoch_ = int(info.get("epoch", self.epoch_))
        if self._due():
            angles = ({a: s / self.win_angle_n_ for a, s in self.win_angle_.items()}
                      if self.win_angle_n_ else None)
            self._record(self._hook_weights(clf), valid=clf.predict_proba, angles=angles)
        self.logger_time_ += time.perf_counter() - t

    @staticmethod
    def _hook_weights(clf):
        """The compartmental network's weight matrices (W, Y: ndim >= 2, as on the skorch path; not its biases or
        sparse masks)."""
        return {k: w for k, w in clf.named_weights().items() if w.ndim >= 2 and not k.startswith("mask")}

    # ------------------------------------------------------------------------------------------------------------
    # shared machinery

    def _begin_fit(self, weights):
        """A fit starts: continue the log when the weights are those of the last record (partial_fit, warm start),
        else start a new one."""
        if self.records_ and not self._same_weights(weights):
            self.initialize()
        if self.records_:
            self.offset_ = self.examples_seen_
            last = self.records_[-1]
            self.elapsed_before_ = last["wall_time"]
        self.hook_seen_ = 0
        self._reset_window()
        self._reset_marks()

    def _same_weights(self, weights):
        prev = self.prev_weights_
        if prev is None or set(prev) != set(weights):
            return False
        return all(prev[k].shape == w.shape and torch.equal(prev[k], w.detach().to(prev[k].device))
                   for k, w in weights.items())

    def _valid_subset(self, device=None):
        """The fixed validation subset, moved once to `device` when given (the skorch net's device)."""
        if self.X_valid is None:
            return None
        if self.valid_ is not None and device is not None and getattr(self, "valid_device_", None) != str(device):
            X, y = self.valid_
            self.valid_ = (X.to(device), y.to(device))
            self.valid_device_ = str(device)
        if self.valid_ is None:
            X, y = self.X_valid, self.y_valid
            X = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
            y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
            n = len(X)
            if self.max_valid is not None and n > int(self.max_valid):
                idx = torch.as_tensor(stratified_indices(y.cpu().numpy(), int(self.max_valid)))
                X, y = X[idx.to(X.device)], y[idx.to(y.device)]
            self.valid_ = (X, y)
            self.valid_device_ = None
            if device is not None:
                return self._valid_subset(device)
        return self.valid_

    def _validate(self, valid, device=None):
        subset = self._valid_subset(device)
        if subset is None or valid is None:
            return _nan(), _nan()
        Xv, yv = subset
        proba = valid(Xv)
        if isinstance(proba, torch.Tensor):
            yv = yv.to(proba.device).long()
            p = proba.detach().float().clamp_min(1e-12)
            loss = -torch.log(p.gather(1, yv[:, None])).mean()
            acc = (p.argmax(1) == yv).float().mean()
            return float(loss), float(acc)
        proba = np.asarray(proba, dtype=np.float64)
        yn = yv.cpu().numpy() if isinstance(yv, torch.Tensor) else np.asarray(yv)
        p = np.clip(proba[np.arange(len(yn)), yn], 1e-12, None)
        return float(-np.log(p).mean()), float((proba.argmax(1) == yn).mean())

    def _record(self, weights, valid=None, angles=None, device=None):
        now = time.perf_counter()
        wall = self.elapsed_before_ + (now - self.t0_ if self.t0_ is not None else 0.0)
        t_valid = time.perf_counter()
        vloss, vacc = self._validate(valid, device)
        if not self.records_:
            self.warmup_time_ = time.perf_counter() - t_valid
        if self.win_n_:
            tloss = float(self.win_loss_) / self.win_n_
            tacc = float(self.win_correct_) / self.win_n_
        else:
            tloss = tacc = _nan()
        names = list(weights)
        cur = [weights[k].detach() for k in names]
        if cur:
            self.device_ = str(cur[0].device)
        norms = [torch.linalg.vector_norm(w.float()) for w in cur]
        prev = self.prev_weights_
        if prev is not None and all(k in prev and prev[k].shape == weights[k].shape for k in names):
            changes = [torch.linalg.vector_norm(w.float() - prev[k].to(w.device).float()) for k, w in zip(names, cur)]
        else:
            changes = None
        # one device->host transfer for all layers
        values = torch.stack(norms + (changes or [])).tolist() if norms else []
        layers = {}
        for i, k in enumerate(names):
            norm = values[i]
            change = values[len(names) + i] if changes is not None else _nan()
            rel = change / norm if norm > 0 else _nan()
            layers[k] = (norm, change, rel)
        self.prev_weights_ = {k: w.clone() for k, w in zip(names, cur)}
        # wall_time includes the logger's own cost so far; train_time excludes it
        logger_time = self.logger_time_
        self.records_.append({
            "record": len(self.records_), "epoch": self.epoch_, "examples_seen": int(self.examples_seen_),
            "wall_time": wall, "train_time": wall - logger_time, "logger_time": logger_time,
            "train_loss": tloss, "train_acc": tacc, "valid_loss": vloss, "valid_acc": vacc,
            "layers": layers, "bp_angle": dict(angles) if angles else {},
        })
        self._reset_window()
        train_time = wall - logger_time
        if (not self.warned_ and len(self.records_) >= 3 and train_time > 0
                and logger_time - self.warmup_time_ > max(OVERHEAD_WARNING * train_time, OVERHEAD_MIN_SECONDS)):
            self.warned_ = True
            n_valid = 0 if self._valid_subset() is None else len(self._valid_subset()[1])
            warnings.warn(f"TrainingLogger: logging has taken {logger_time:.3g} s for {train_time:.3g} s of training "
                          f"({100 * logger_time / train_time:.0f} %), mostly validating {n_valid} examples "
                          f"{self.records_per_epoch} times per epoch; lower max_valid or records_per_epoch "
                          f"(the compartmental network's predict_proba is especially costly: also its "
                          f"l_f_phase_test)", LoggerOverheadWarning, stacklevel=2)

    # ------------------------------------------------------------------------------------------------------------
    # output

    def to_frame(self):
        """Tidy long DataFrame: one row per record x weight matrix (+ one per record x hidden layer with an angle);
        columns run, RECORD_COLUMNS, LAYER_COLUMNS (utils.runs.records_frame)."""
        return records_frame(self.records_, self.name if self.name is not None else "run")

    @property
    def history(self):
        """One row per record (the learning curves), without the per-layer columns."""
        return curves(self.to_frame())

    def save(self, run_dir, config=None):
        """Write run_dir/config.json (the run's configuration + library versions + logger settings) and
        run_dir/records.csv (`to_frame()`) with `utils.runs.save_run`; read them back with `utils.runs.load_run`.
        Returns the run directory as a Path."""
        cfg = dict(config or {})
        cfg.setdefault("run", self.name if self.name is not None else Path(run_dir).name)
        cfg["logger"] = {"records_per_epoch": int(self.records_per_epoch), "max_valid": self.max_valid,
                         "n_valid": None if self._valid_subset() is None else len(self._valid_subset()[1]),
                         "n_records": len(self.records_), "logger_time_s": self.logger_time_}
        cfg["versions"] = library_versions(self.device_)
        self.config_ = cfg  # what config.json holds: utils.runs.concat_runs takes the logger as it takes the folder
        return save_run(run_dir, self.to_frame().assign(run=cfg["run"]), cfg)

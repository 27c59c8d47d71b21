"""Bayesian optimization of each model's hyperparameters with k-fold cross-validation (the study of issue 5), with
several evaluations side by side, on every GPU of a machine or of several (issue 18).

Long runs (a GPU server, inside tmux or screen; a run that is killed resumes from its files when started again):

    python -m utils.bayes_opt --model cnn --dataset cifar10 --iterations 50 --epochs 10 --folds 3 --out logs/
    python -m utils.bayes_opt --summary --out logs/            # the table of every study under logs/ (also live)
    python -m utils.bayes_opt ... --scheduler tcp://host:8786  # on a running Dask cluster (see README)

(Always `python -m utils.bayes_opt` from the repository root: run as a file, this module would shadow the
bayes_opt package it is built on.)

In a notebook:

    from utils.bayes_opt import run_study, summarize, load_results
    run_study("mlp", "mnist", iterations=50, folds=3, epochs=10, out="logs")
    summarize("logs")        # model, dataset, best, worst, mean, std, n_evals, frac_chance, best_params, test_acc

Rounds: each round proposes q points at once (the points proposed earlier in the round enter the Gaussian process
at a lie, the lowest score so far: with_lies, the constant liar) and evaluates them side by side: in this process
one after the other (cluster=None; the compartmental candidates of one structure still train as one population),
or as tasks on Dask distributed (cluster="local": a LocalCluster, or one worker per GPU with dask_cuda; a scheduler
address or a Client: a running cluster; see utils/cluster.py). Every evaluation is appended to the log when it
finishes, by this process only; the next round starts when the whole round is in. q = 1 in this process is the
study as it was before rounds.

Files of one study, <out>/<model>_<dataset>/:
    config.json            the study's settings (space, folds, epochs, seed, subset, flip_prob, versions); checked on
                           resume; strict JSON (infinities written as the strings "inf", "-inf")
    evals.jsonl            one JSON line per finished evaluation, written and fsync'ed at once: the source of truth,
                           from which a resumed study rebuilds its optimizer (there is no other state file)
    evals.jsonl.rejected   bad lines found in evals.jsonl (not UTF-8, not JSON, keys missing), set aside on resume
    lock                   held (flock) by the process running the study: a second one on the folder is refused
    best.json              the best configuration retrained on the full training split, with its test accuracy

A record of evals.jsonl: iteration, status ("ok", "diverged", "oom", "error", "killed", "invalid"), target (the
objective: mean fold accuracy, chance for failures, null for invalid), fold_scores, params (the optimizer's),
hyperparameters (make_classifier's), seed, time_s (the evaluation's wall time; a population's members share theirs),
peak_mem_mb and mem_kind (see PeakMemory: CUDA tensor peak on a GPU, the peak resident set size of the process that
trained it on the CPU), source (how it was proposed), rejected, reason, round and round_size (the first iteration
and the size of its round), population (candidates trained together), finished (timestamp).

The first evaluation is a known configuration (reference(): make_classifier's defaults for the MLP and CNN, the
paper's network for the compartmental model; source "start"), so the Gaussian process starts from a point that
learns; `start=None` (`--no-reference`) makes it random like the other init_points.

The compartmental network's option flags: the seed study drew all 11 uniformly, and such networks stay at chance
(README). Here random draws take the paper's flags, each flipped with probability flip_prob (FLIP_PROB; 0.5 is the
seed's uniform draw), the other parameters uniform over the seed's space; after the init_points the Gaussian process
picks the acquisition's maximum among N_CANDIDATES such draws (source "bo-prior"). flip_prob=None restores uniform
flags and bayes_opt's own suggestions.

How the loop treats awkward proposals (everything is logged, one line each in evals.jsonl):
- invalid CNN (utils.models.cnn_feature_shape raises; about 2 in 3 random CNN configurations are): never trained.
  Random proposals are drawn until valid. When bayes_opt's suggestion is invalid it is logged with status "invalid"
  and its reason, NOT registered with the optimizer (a chance score at an arithmetic constraint would only distort
  the Gaussian process), and replaced by the acquisition's maximum over random valid candidates. Invalid lines do
  not count in `iterations`; summarize() reports them as n_invalid.
- a suggestion that was already evaluated or proposed earlier in its round (integer and categorical parameters make
  that common) is replaced the same way (source "bo-valid (duplicate)"); no point is ever registered twice.
- a training that diverges (utils.errors.TrainingDiverged), runs out of memory (CUDA or CPU), or is refused by the
  estimator's validation (ValueError) scores chance accuracy, 1 / n_classes, with status "diverged", "oom" or
  "error" and the reason; so does one whose task killed Dask workers again and again ("killed"); it is registered,
  counts as an iteration, and the loop goes on. Any other exception is a bug and stops the study (resume it after the
  fix). A worker that dies loses only its running evaluations: Dask runs them again elsewhere.
Evaluation number i (the record's "iteration", 0-based) trains with seed + i, wherever it runs; the folds are fixed
by `seed`; the proposals of the round that starts at evaluation i are made from the evaluations before i, with the
optimizer's random state re-seeded from (seed, i): a study killed half-way through a round, resumed, proposes that
round again exactly as it was (its records carry the round and its size, even if q changed) and runs only its
unfinished evaluations, so that it ends as the uninterrupted study would have.
"""
import argparse
import contextlib
import io
import json
import math
import os
import resource
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from utils.compartmental_reference import FLAGS
from utils.rules import rule_models, split_model

# ----------------------------------------------------------------------------------------------------------------
# search spaces, as the seed study had them. bayes_opt 3.x bounds: (lo, hi) float, (lo, hi, int) integer (inclusive),
# a list of values categorical. Variable depth: n_layers / n_blocks plus one entry per possible layer, of which only
# the first n_layers / n_blocks are used (to_hyperparameters below). Learning rates are searched as log10.

MAX_LAYERS = 6  # MLP and compartmental hidden layers
MAX_BLOCKS = 5  # CNN convolution blocks
LOG10_LR = (-4.0, math.log10(5e-2))  # Adam learning rate 1e-4 .. 5e-2
FLAG = ["off", "on"]  # categorical (a [False, True] pair would be read as the float range 0..1)

COMPARTMENTAL_FLAGS = tuple(  # the searched CompartmentalClassifier switches: its FLAGS (defined once, in
    f for f in FLAGS if f not in ("extra_steps", "record_backprop_angle")   # compartmental_reference.Config) but two
)

SPACES = {
    "mlp": {
        "batch_size": (10, 500, int),
        "log10_lr": LOG10_LR,
        "n_layers": (1, MAX_LAYERS, int),
        **{f"units_{i}": (30, 500, int) for i in range(1, MAX_LAYERS + 1)},
    },
    "cnn": {
        "batch_size": (10, 500, int),
        "log10_lr": LOG10_LR,
        "n_blocks": (1, MAX_BLOCKS, int),
        **{f"channels_{i}": (3, 64, int) for i in range(1, MAX_BLOCKS + 1)},
        **{f"kernel_{i}": (2, 10, int) for i in range(1, MAX_BLOCKS + 1)},
        "stride": (1, 3, int),   # one stride and one padding for all blocks, as in the seed study
        "padding": (1, 3, int),
    },
    "compartmental": {  # the paper's values in comments; times in ms, phases in time steps (see to_hyperparameters)
        **{flag: FLAG for flag in COMPARTMENTAL_FLAGS},
        "dt": (0.25, 1.0),               # 1.0: Euler time step (ms); above 1 the somatic Euler step can go unstable
        "l_f_phase": (20, 200, int),     # 50: forward phase, time steps
        "l_t_phase": (20, 200, int),     # 50: target phase, time steps
        "integration_frac": (0.2, 0.9),  # 0.4: integration_time = frac * min(l_f_phase, l_t_phase) (<= both phases)
        "lambda_max": (0.05, 0.5),       # 0.2: maximum spike rate (spikes per time step)
        "tau_s": (1.0, 10.0),            # 3: synaptic time constant (ms)
        "tau_delta": (1.0, 30.0),        # 7: tau_L = tau_s + tau_delta > tau_s (the kernel needs tau_s != tau_L)
        "g_B": (0.1, 1.0),               # 0.6: basal conductance (g_D = g_B in the output layer, as in the paper)
        "g_A": (0.01, 0.2),              # 0.05: apical conductance (used with use_apical_conductance)
        "E_E": (2.0, 16.0),              # 8: excitatory reversal potential
        "E_I": (-16.0, -2.0),            # -8: inhibitory reversal potential
        "log10_f_eta_hidden": (-3.0, 1.5),  # 0.21 online: forward rate of every hidden layer (batches average
        #                                     their updates: at batch 16 about 0.21 x 32 = 6.7 learns, so up to 31.6)
        "log10_f_eta_out": (-3.0, 0.0),     # 0.21: forward learning rate of the output layer
        "log10_b_eta": (-4.0, -1.0),        # feedback learning rate of every hidden layer (learned feedback)
        "n_layers": (1, MAX_LAYERS, int),
        **{f"units_{i}": (30, 500, int) for i in range(1, MAX_LAYERS + 1)},
    },
}

def reference(model, batch_size=None):
    """The study's first evaluation (unless start=None), in the search space's coordinates: the estimator's own
    defaults, so that no study ends below them - make_classifier's for the MLP and CNN, CompartmentalClassifier's
    (the paper's network and settings) with the paper's learning rates for the compartmental model, scaled by
    batch_f_etas for a batch_size > 1. Read from those defaults, so that the two never drift apart."""
    model = split_model(model)[0]   # "mlp-fa" searches the MLP's space; make_classifier adds the rule
    if model in ("mlp", "cnn"):
        from utils.train import CNN_DEFAULTS, COMMON_DEFAULTS, MLP_DEFAULTS
        ref = dict(batch_size=COMMON_DEFAULTS["batch_size"], log10_lr=math.log10(COMMON_DEFAULTS["lr"]))
        if model == "mlp":
            sizes = MLP_DEFAULTS["hidden_sizes"]
            return {**ref, "n_layers": len(sizes), **{f"units_{i}": n for i, n in enumerate(sizes, 1)}}
        d = CNN_DEFAULTS
        return {**ref, "n_blocks": len(d["channels"]), "stride": d["stride"], "padding": d["padding"],
                **{f"channels_{i}": c for i, c in enumerate(d["channels"], 1)},
                **{f"kernel_{i}": k for i, k in enumerate(d["kernel_sizes"], 1)}}
    if model == "compartmental":
        from utils.compartmental import PAPER_F_ETAS, CompartmentalClassifier, batch_f_etas
        d = CompartmentalClassifier().get_params()
        (eta_hidden, eta_out), sizes = batch_f_etas(batch_size or 1, PAPER_F_ETAS[1]), d["n_hidden"]
        return {**{flag: FLAG[bool(d[flag])] for flag in COMPARTMENTAL_FLAGS},
                **{k: d[k] for k in ("dt", "l_f_phase", "l_t_phase", "lambda_max", "tau_s", "g_B", "g_A", "E_E",
                                     "E_I")},
                "integration_frac": d["integration_time"] / min(d["l_f_phase"], d["l_t_phase"]),
                "tau_delta": d["tau_L"] - d["tau_s"], "log10_f_eta_hidden": math.log10(eta_hidden),
                "log10_f_eta_out": math.log10(eta_out), "n_layers": len(sizes),
                **{f"units_{i}": n for i, n in enumerate(sizes, 1)}}
    raise ValueError(f"unknown model {model!r}; valid: {', '.join(SPACES)}")


def reference_params(model, space, batch_size=None):
    """reference(model) as a complete point of `space`: parameters it leaves open (unused layers, the feedback rate)
    at their lower bound, values clipped into the bounds (phases capped by max_phase, g_A = 0 raised to 0.01). For
    the compartmental network with batch_size B > 1, whose batch updates are averaged, the rates are scaled by
    utils.compartmental.batch_f_etas (hidden x 2 B, output x 2: the paper's 0.21 becomes 6.72 and 0.42 at B = 16)."""
    ref = reference(model, batch_size)
    point = {}
    for key, bounds in space.items():
        if isinstance(bounds, list):
            point[key] = ref.get(key, bounds[0])
            continue
        lo, hi = bounds[0], bounds[1]
        value = min(max(ref.get(key, lo), lo), hi)
        point[key] = int(round(value)) if len(bounds) == 3 and bounds[2] is int else float(value)
    return point


N_CANDIDATES = 1000  # random valid candidates over which the acquisition is maximized (see propose)
MAX_RANDOM_DRAWS = 10_000  # random draws to find one valid configuration before giving up
KAPPA = 2.576        # UCB's exploration weight (mean + KAPPA std)
LIE = "min"          # constant liar: points proposed earlier in a round enter the GP at the lowest score so far
FLIP_PROB = 0.05     # compartmental: each option flag is the paper's, flipped with this probability (see flag_sampler)
AT_CHANCE = 1.5      # summarize's frac_chance: evaluations scoring below AT_CHANCE x chance (15 % on 10 classes)
FAILURES = ("diverged", "oom", "error", "killed")
OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")  # torch's CUDA and CPU wording
LOG_KEYS = ("iteration", "status", "target", "params")  # a record of evals.jsonl without these is set aside


def make_space(model, max_phase=None):
    """The search space of `model` (a copy of SPACES[model]); max_phase caps the compartmental phase lengths (reduced
    runs only: the phases are still searched, within [lower bound, max_phase])."""
    if split_model(model)[0] not in SPACES:   # "mlp-fa" ...: the kind's space
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(SPACES)} and {', '.join(rule_models())}")
    space = dict(SPACES[split_model(model)[0]])
    if max_phase is not None:
        if model != "compartmental":
            raise ValueError("max_phase only applies to the compartmental model")
        for key in ("l_f_phase", "l_t_phase"):
            lo, hi, typ = space[key]
            if max_phase < lo:
                raise ValueError(f"max_phase={max_phase} is below the lower bound {lo} of {key}")
            space[key] = (lo, min(hi, int(max_phase)), typ)
    return space


def to_hyperparameters(model, params):
    """Optimizer parameters (one flat dict of floats/ints/bools) -> keyword arguments of make_classifier(model)."""
    model = split_model(model)[0]   # "mlp-fa" searches the MLP's space; make_classifier adds the rule
    p = params
    if model == "mlp":
        return dict(hidden_sizes=tuple(int(p[f"units_{i}"]) for i in range(1, int(p["n_layers"]) + 1)),
                    lr=10.0 ** float(p["log10_lr"]), batch_size=int(p["batch_size"]))
    if model == "cnn":
        n = int(p["n_blocks"])
        return dict(channels=tuple(int(p[f"channels_{i}"]) for i in range(1, n + 1)),
                    kernel_sizes=tuple(int(p[f"kernel_{i}"]) for i in range(1, n + 1)),
                    stride=int(p["stride"]), padding=int(p["padding"]),
                    lr=10.0 ** float(p["log10_lr"]), batch_size=int(p["batch_size"]))
    if model == "compartmental":
        # derived as in the paper's code: tau_L = tau_s + tau_delta, g_L = 1 / tau_L, g_D = g_B, mem = 10 ms / dt;
        # symmetric feedback ties Y to W, so it switches learned feedback off (the estimator refuses both)
        n = int(p["n_layers"])
        l_f, l_t = int(p["l_f_phase"]), int(p["l_t_phase"])
        tau_s, tau_L, dt = float(p["tau_s"]), float(p["tau_s"]) + float(p["tau_delta"]), float(p["dt"])
        flags = {flag: p[flag] in ("on", True) for flag in COMPARTMENTAL_FLAGS}
        if flags["use_symmetric_weights"]:
            flags["update_feedback_weights"] = False
        return dict(
            n_hidden=tuple(int(p[f"units_{i}"]) for i in range(1, n + 1)),
            f_etas=(10.0 ** float(p["log10_f_eta_hidden"]),) * n + (10.0 ** float(p["log10_f_eta_out"]),),
            b_etas=(10.0 ** float(p["log10_b_eta"]),) * n,
            dt=dt, mem=max(1, int(round(10.0 / dt))), l_f_phase=l_f, l_t_phase=l_t,
            integration_time=max(1, int(round(float(p["integration_frac"]) * min(l_f, l_t)))),
            lambda_max=float(p["lambda_max"]), tau_s=tau_s, tau_L=tau_L, g_L=1.0 / tau_L,
            g_B=float(p["g_B"]), g_D=float(p["g_B"]), g_A=float(p["g_A"]), E_E=float(p["E_E"]), E_I=float(p["E_I"]),
            **flags)
    raise ValueError(f"unknown model {model!r}; valid: {', '.join(SPACES)}")


def make_estimator(model, **kw):
    """The one place where a study's model name becomes an estimator (utils.train.make_classifier's kind)."""
    from utils.train import make_classifier
    return make_classifier(model, **kw)


def check_hyperparameters(model, hp, in_shape):
    """None when make_classifier(model, **hp) can be trained on inputs of shape in_shape (C, H, W), else the reason.
    Only the CNN has proposals that are invalid by construction (a block whose output is empty or fractional); the
    compartmental ones are checked against the estimator's own validation as a safeguard."""
    model = split_model(model)[0]   # "mlp-fa" searches the MLP's space; make_classifier adds the rule
    try:
        if model == "cnn":
            from utils.models import cnn_feature_shape
            cnn_feature_shape(in_shape, hp["channels"], hp["kernel_sizes"], hp["stride"], hp["padding"])
        elif model == "compartmental":  # the estimator's own checks (to_hyperparameters keeps proposals valid)
            from utils.compartmental import CompartmentalClassifier
            CompartmentalClassifier(**hp)._check_params()
    except ValueError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------------------------
# files: an append-only JSON-lines log and atomic JSON writes


def read_log(path, repair=True):
    """The finished records of a JSON-lines log. A last line without its newline is a write cut short by a kill: it is
    dropped (and, with repair=True, cut off the file). Any other bad line (not UTF-8, not JSON, a record without
    the LOG_KEYS) is reported by a warning naming its line number and, with repair=True, moved out of the log to
    <name>.rejected beside it, so that the study goes on from the good lines."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished write
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    records, good, bad = [], [], []
    for i, line in enumerate(data[:end].splitlines(keepends=True), start=1):
        if not line.strip():
            continue
        problem = _bad_line(line)
        if problem:
            bad.append((i, line, problem))
        else:
            records.append(json.loads(line))
            good.append(line)
    if bad:
        where = "; ".join(f"line {i}: {p}" for i, _, p in bad[:5]) + (" ..." if len(bad) > 5 else "")
        note = ""
        if repair:
            aside = path.with_name(path.name + ".rejected")
            with open(aside, "ab") as f:
                f.write(b"".join(line for _, line, _ in bad))
            _replace_bytes(path, b"".join(good))
            note = f"; moved to {aside} (the study goes on without them)"
        warnings.warn(f"{path}: {len(bad)} bad line(s) set aside ({where}){note}", stacklevel=2)
    return records


def _bad_line(line):
    """None for a good log line (bytes), else what is wrong with it."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e})"
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in LOG_KEYS if k not in record]
    return f"a record without {', '.join(missing)}" if missing else None


def _replace_bytes(path, data):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dumps(obj, **kw):
    """json.dumps that writes only JSON: infinities and NaN become the strings "inf", "-inf", "nan"."""
    return json.dumps(_finite(obj), default=_json_default, allow_nan=False, **kw)


def _finite(o):
    if isinstance(o, (float, np.floating)) and not math.isfinite(o):
        return str(float(o))
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, np.ndarray)):
        return [_finite(v) for v in o]
    return o


def append_log(path, *records):
    """Append records, one line each, in one write, flushed and fsync'ed before returning."""
    text = "".join(_dumps(r) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_log(path, records):
    """Replace the log by `records` (atomically: temp file + os.replace)."""
    _replace_bytes(Path(path), "".join(_dumps(r) + "\n" for r in records).encode("utf-8"))


def write_json(path, obj):
    """Write JSON atomically (a temp file beside `path`, then os.replace); no Infinity or NaN (see _dumps)."""
    _replace_bytes(Path(path), _dumps(obj, indent=2).encode("utf-8"))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if o is int or o is float:
        return o.__name__
    return str(o)


def _plain(params):
    """Optimizer params with numpy scalars turned into Python ones (JSON round-trips them exactly)."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}


def _space_json(space):
    return {k: ([v[0], v[1], v[2].__name__] if len(v) == 3 and v[2] in (int, float) else list(v))
            for k, v in space.items()}


# ----------------------------------------------------------------------------------------------------------------
# the optimizer: q proposals per round


def make_optimizer(space, rng):
    """A bayes_opt BayesianOptimization over `space`, silent, with UCB, using (and re-seeded through) `rng`."""
    from bayes_opt import BayesianOptimization, acquisition
    with warnings.catch_warnings():  # 3.x warns that integer/categorical parameters are "experimental"
        warnings.simplefilter("ignore")
        optimizer = BayesianOptimization(f=None, pbounds=space, acquisition_function=acquisition.UpperConfidenceBound(
            kappa=KAPPA), random_state=rng, verbose=0, allow_duplicate_points=True)
    optimizer.pbounds_ = dict(space)
    return optimizer


def with_lies(optimizer, pending):
    """The constant liar: a copy of the optimizer whose data also hold the points `pending` (proposed earlier in
    the round, not yet evaluated) at the lie (LIE: the lowest score so far), so that the GP sees no reward in
    proposing them or their surroundings again. The optimizer itself when nothing is pending. (bayes_opt 3.4's own
    acquisition.ConstantLiar copies the data space by zipping parameter names with encoded bounds, which breaks
    categorical parameters such as the compartmental flags; this does the same lie on a rebuilt optimizer.)"""
    if not pending:
        return optimizer
    space = optimizer.space
    lied = make_optimizer(optimizer.pbounds_, optimizer._random_state)
    for x, target in zip(space.params, space.target):
        register(lied, space.array_to_params(x), target)
    lie = {"min": np.min, "max": np.max, "mean": np.mean}[LIE](space.target)
    for p in pending:
        register(lied, p, lie)
    return lied


def register(optimizer, params, target):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the duplicate notice prints; we never register duplicates anyway
        optimizer.register(params=params, target=float(target))


def _key(optimizer, params):
    return tuple(optimizer.space.params_to_array(params))


def _seen(optimizer, params):
    return optimizer.space.params_to_array(params) in optimizer.space


def uniform_sampler(optimizer):
    """Random points of the space, uniform as bayes_opt draws them (the seed study's draws)."""
    return lambda n: [_plain(p) for p in optimizer.random_sample(n)]


def flag_sampler(optimizer, rng, paper_flags, flip_prob):
    """Random points of the compartmental space whose option flags are the paper's (paper_flags: flag -> "on" /
    "off"), each flipped with probability flip_prob (0: always the paper's, 0.5: uniform like the seed study's
    draws, 1: all flipped); every other parameter uniform."""
    def sample(n):
        points = []
        for p in optimizer.random_sample(n):
            p = _plain(p)
            for flag, value in paper_flags.items():
                p[flag] = FLAG[1 - FLAG.index(value)] if rng.random_sample() < flip_prob else value
            points.append(p)
        return points
    return sample


def _random_valid(optimizer, is_valid, n=1, exclude=(), sample=None):
    """`n` random valid points, unseen and not in `exclude` (keys, see _key), fewer if the space has no more, and
    the number of draws thrown away."""
    sample = sample or uniform_sampler(optimizer)
    found, drawn, keys = [], 0, set(exclude)
    while len(found) < n and drawn < MAX_RANDOM_DRAWS:
        for params in sample(min(max(2 * n, 16), MAX_RANDOM_DRAWS - drawn)):
            drawn += 1
            key = _key(optimizer, params)
            if key not in keys and not _seen(optimizer, params) and is_valid(params):
                found.append(params)
                keys.add(key)
                if len(found) == n:
                    break
    if not found:
        raise RuntimeError(f"no valid unseen configuration in {MAX_RANDOM_DRAWS} random draws; the space is too "
                           f"small or (almost) everywhere invalid")
    return found, drawn - len(found)


def _predict(optimizer, candidates, pending):
    """GP mean and std at the candidates, the round's pending points entered at the lie (with_lies)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return with_lies(optimizer, pending).predict(candidates, return_std=True, fit_gp=True)


def _best_valid_candidate(optimizer, is_valid, pending=(), sample=None):
    """The acquisition (UCB: mean + KAPPA std of the GP) maximized over N_CANDIDATES random valid unseen points that
    are not pending: the suggestion when the library's own is invalid or already evaluated, and always where a prior
    draws the candidates (the compartmental flags)."""
    exclude = {_key(optimizer, p) for p in pending}
    candidates, rejected = _random_valid(optimizer, is_valid, N_CANDIDATES, exclude, sample)
    mean, std = _predict(optimizer, candidates, list(pending))
    ucb = np.asarray(mean) + KAPPA * np.asarray(std)
    return candidates[int(np.argmax(ucb))], rejected


def propose(optimizer, rng, seed, iteration, init_points, check, start=None, size=1, sample=None):
    """The points of the round of `size` evaluations that starts at evaluation number `iteration`: a list of
    (params, source, rejected, invalid), deterministic in (seed, iteration, size, the registered data).
    check(params) -> None when valid, else the reason. sample: the random draws (default uniform; flag_sampler for
    the compartmental network, whose GP proposals are then the acquisition's maximum over such draws).

    source: "start" (evaluation 0 is `start` when given, valid and not yet evaluated), "random" (the first
    init_points evaluations), "bo" (bayes_opt's own suggestion, the round's earlier points lied in: with_lies),
    "bo-prior" (the
    acquisition's maximum over draws of `sample`), "bo-valid (invalid)" or "bo-valid (duplicate)" (bayes_opt's
    suggestion was invalid or already evaluated or proposed, so the acquisition was maximized over random valid
    candidates instead). rejected: random draws thrown away as invalid or seen. invalid: (params, reason) of an
    invalid suggestion, for the log, else None."""
    rng.seed((seed * 1_000_003 + iteration) % 2**32)
    picked = []
    for it in range(iteration, iteration + size):
        pending = [p[0] for p in picked]
        picked.append(_propose_one(optimizer, it, init_points, check, start, pending, sample))
    return picked


def _propose_one(optimizer, iteration, init_points, check, start, pending, sample):
    def is_valid(p):
        return check(p) is None

    keys = {_key(optimizer, p) for p in pending}
    if iteration == 0 and start is not None and is_valid(start) and not _seen(optimizer, start):
        return dict(start), "start", 0, None
    if iteration < init_points or len(optimizer.space) == 0:
        (params,), rejected = _random_valid(optimizer, is_valid, exclude=keys, sample=sample)
        return params, "random", rejected, None
    if sample is not None:
        params, rejected = _best_valid_candidate(optimizer, is_valid, pending, sample)
        return params, "bo-prior", rejected, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = _plain(with_lies(optimizer, pending).suggest())
    reason = check(params)
    if reason is None and not _seen(optimizer, params) and _key(optimizer, params) not in keys:
        return params, "bo", 0, None
    candidate, rejected = _best_valid_candidate(optimizer, is_valid, pending)
    if reason is None:
        return candidate, "bo-valid (duplicate)", rejected, None
    return candidate, "bo-valid (invalid)", rejected, (params, reason)


# ----------------------------------------------------------------------------------------------------------------
# one evaluation: cross-validated accuracy, with failures scored at chance


class PeakMemory:
    """Peak memory of the block, in MiB. On CUDA: torch.cuda.max_memory_allocated (tensors only, reset at entry;
    kind "cuda_max_allocated"). On the CPU: the process's resident set size sampled every 20 ms from /proc
    (kind "cpu_peak_rss": the whole process, data and Python included), or where /proc is missing the process's
    lifetime high-water mark ru_maxrss (kind "cpu_maxrss", never decreases between evaluations)."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"

    def __enter__(self):
        self.peak, self._stop = 0.0, threading.Event()
        if self.cuda:
            import torch
            torch.cuda.reset_peak_memory_stats()
            self.kind = "cuda_max_allocated"
        elif Path("/proc/self/statm").exists():
            self.kind = "cpu_peak_rss"
            self._page = os.sysconf("SC_PAGE_SIZE")
            self._sample()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        else:
            self.kind = "cpu_maxrss"
        return self

    def _sample(self):
        with open("/proc/self/statm") as f:
            self.peak = max(self.peak, int(f.read().split()[1]) * self._page / 2**20)

    def _poll(self):
        while not self._stop.wait(0.02):
            self._sample()

    def __exit__(self, *exc):
        if self.cuda:
            import torch
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        elif self.kind == "cpu_peak_rss":
            self._stop.set()
            self._thread.join()
            self._sample()
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        return False


def run_evaluation(evaluate, hp, chance, device=None):
    """evaluate(hp) -> per-fold scores, with failures caught: a dict(status, fold_scores, target, reason, time_s,
    peak_mem_mb, mem_kind). Diverged, out-of-memory and ValueError runs score `chance`; other exceptions propagate."""
    from utils.errors import TrainingDiverged
    import torch
    status, scores, reason = "ok", None, None
    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        try:
            scores = [float(s) for s in np.asarray(evaluate(hp), dtype=float).ravel()]
            if not scores or not all(math.isfinite(s) for s in scores):
                status, reason, scores = "error", f"the objective returned {scores}", None
        except TrainingDiverged as e:
            status, reason = "diverged", str(e)
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            status, reason = "oom", f"{type(e).__name__}: {e}"
        except RuntimeError as e:
            if not any(m in str(e).lower() for m in OOM_MESSAGES):
                raise
            status, reason = "oom", str(e)
        except ValueError as e:
            status, reason = "error", f"ValueError: {e}"
    if status == "oom":
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return dict(status=status, fold_scores=scores, target=float(np.mean(scores)) if status == "ok" else chance,
                reason=reason, time_s=round(time.perf_counter() - t0, 3), peak_mem_mb=round(mem.peak, 1),
                mem_kind=mem.kind)


def _seed_kw(accepts, seed):
    """The estimator's seed argument (every kind calls it seed)."""
    return {"seed": seed} if "seed" in accepts else {}


def _estimator_accepts(model):
    """The keyword names make_classifier(model) accepts beyond the searched ones (seed, device, verbose...)."""
    if model == "compartmental":
        import inspect
        from utils.compartmental import CompartmentalClassifier
        return set(inspect.signature(CompartmentalClassifier.__init__).parameters) - {"self"}
    return {"max_epochs", "seed", "device", "verbose"}


# ----------------------------------------------------------------------------------------------------------------
# the study


def _versions():
    import bayes_opt
    import sklearn
    import torch
    return {"python": sys.version.split()[0], "torch": torch.__version__, "bayes_opt": bayes_opt.__version__,
            "sklearn": sklearn.__version__, "numpy": np.__version__}


def _fmt_time(s):
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_study(model, dataset, iterations=50, folds=3, epochs=10, out="logs", *, seed=0, subset=None, device=None,
              init_points=5, fixed=None, max_phase=None, retrain=True, retrain_subset=None, test_subset=None,
              data_root=None, name=None, evaluate=None, start="reference", q=None, cluster=None,
              flip_prob=FLIP_PROB, verbose=1):
    """Tune `model` ("mlp", "cnn", "compartmental") on `dataset` by Bayesian optimization of the mean `folds`-fold
    cross-validated accuracy after `epochs` epochs; `iterations` trained evaluations in all (resumes from
    <out>/<model>_<dataset>/ when it exists: the ones already logged are not redone).

    dataset: a name of utils.data.DATASETS, or a utils.data.Dataset (then `name` names it; default "custom").
    subset: cross-validate on a stratified subset of this many training examples (None: the whole training split).
    init_points: random configurations before the Gaussian process proposes (the first is replaced by `start`).
    start: "reference" (default): evaluation 0 is reference(model) (the paper's network for the compartmental
    model, learning rates scaled for a fixed batch size); a dict: that point of the search space; None: random.
    fixed: extra keyword arguments for every make_classifier call (e.g. {"batch_size": 20} for the compartmental net).
    max_phase: cap of the compartmental phase lengths in the space (reduced runs).
    q: evaluations proposed per round and run side by side (default: 1 in this process, the cluster's worker
    threads on a cluster). cluster: None (this process), "local" (a Dask cluster started here and closed at the end:
    one worker per GPU, else CPU workers), a scheduler address "tcp://host:8786", or a distributed.Client.
    flip_prob: compartmental only: random draws take the paper's option flags, each flipped with this probability,
    and the GP picks among such draws (flag_sampler); None: every flag uniform and bayes_opt's own suggestions, as
    the seed study did.
    retrain: afterwards, fit the best configuration on the whole training split (or a stratified `retrain_subset`) and
    score it on the test split (or a stratified `test_subset`) -> best.json.
    evaluate: evaluate(hyperparameters) -> per-fold scores, replacing make_classifier + cross_validate (tests).
    Returns dict(study_dir, evals (DataFrame), summary (one-row DataFrame), best (record), test_acc).
    """
    from utils.data import Dataset, get_device, load_dataset, stratified_subset
    if split_model(model)[0] not in SPACES:
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(SPACES)}")
    if q is not None and (not isinstance(q, (int, np.integer)) or q < 1):
        raise ValueError(f"q={q!r}: give a positive number of evaluations per round")
    if flip_prob is not None and not 0 <= flip_prob <= 1:
        raise ValueError(f"flip_prob={flip_prob!r}: give a probability in [0, 1], or None for uniform flags")
    if isinstance(dataset, str):
        name = name or dataset
        ds = load_dataset(dataset, root=data_root, device=device)
    elif isinstance(dataset, Dataset):
        name, ds = name or "custom", dataset
    else:
        raise TypeError(f"dataset must be a dataset name or a utils.data.Dataset, not {type(dataset).__name__}")
    X, y = ds.X_train, ds.y_train
    if subset:
        X, y = stratified_subset(X, y, int(subset), seed=seed)
    dev = get_device(device) if device is not None else X.device
    n_classes, in_shape = len(ds.classes), tuple(int(d) for d in X.shape[1:])
    chance = 1.0 / n_classes
    space = make_space(model, max_phase)
    fixed = dict(fixed or {})
    flip_prob = flip_prob if model == "compartmental" else None
    if isinstance(start, str):
        if start != "reference":
            raise ValueError(f"start={start!r}: use 'reference', None, or a dict of search-space parameters")
        start = reference_params(model, space, fixed.get("batch_size"))
    elif start is not None:
        unknown, missing = set(start) - set(space), set(space) - set(start)
        if unknown or missing:
            raise ValueError(f"start must set every parameter of the {model} search space: unknown {sorted(unknown)}"
                             f", missing {sorted(missing)}")

    study_dir = Path(out) / f"{model}_{name}"
    study_dir.mkdir(parents=True, exist_ok=True)
    config = dict(model=model, dataset=name, folds=folds, epochs=epochs, seed=seed, subset=subset,
                  n_train=len(y), n_classes=n_classes, in_shape=list(in_shape), init_points=init_points,
                  fixed=fixed, max_phase=max_phase, space=_space_json(space), start=start, flip_prob=flip_prob)
    client, own_cluster = _connect(cluster, verbose)
    try:
        with study_lock(study_dir):
            _check_config(study_dir, config)
            q = q or (1 if client is None else _slots(client))
            write_json(study_dir / "config.json", {**config, "iterations": iterations, "q": q,
                                                   "versions": _versions()})
            accepts = _estimator_accepts(model)
            base = {k: v for k, v in dict(max_epochs=epochs, device=str(dev) if client is None else device,
                                          verbose=0).items() if k in accepts}
            ctx = dict(model=model, folds=folds, seed=seed, chance=chance, token=f"{study_dir}:{len(y)}",
                       device=str(dev) if client is None else device)
            from utils import cluster as cl
            executor = (cl.Local((X, y), ctx, evaluate) if client is None
                        else cl.Distributed(client, (X, y), ctx, evaluate))
            try:
                records = _run_rounds(model, name, study_dir, space, iterations, init_points, seed, start, q,
                                      flip_prob, base, fixed, accepts, in_shape, executor, evaluate, verbose)
                test_acc, best = None, _best_record(records)
                if retrain and best is not None:
                    test_acc = _retrain(model, ds, best, study_dir, base, fixed, accepts, seed, retrain_subset,
                                        test_subset, chance, dev, len({r["iteration"] for r in records
                                                                       if r["status"] != "invalid"}),
                                        verbose, name, executor)
            finally:
                executor.close()
    finally:
        if own_cluster is not None:
            client.close()
            own_cluster.close()
    evals = load_results(study_dir)
    return dict(study_dir=study_dir, evals=evals, summary=summarize(evals), best=best, test_acc=test_acc)


def _connect(cluster, verbose):
    """(client, cluster to close or None) for run_study's `cluster` argument."""
    if cluster is None:
        return None, None
    if isinstance(cluster, str):
        from utils.cluster import start_client
        return start_client(None if cluster == "local" else cluster, verbose=verbose)
    if hasattr(cluster, "submit") and hasattr(cluster, "nthreads"):
        return cluster, None
    raise ValueError(f"cluster={cluster!r}: use None, 'local', a scheduler address 'tcp://host:8786' or a "
                     f"distributed.Client")


def _slots(client):
    from utils.cluster import slots
    return slots(client)


def _check_config(study_dir, config):
    """Refuse to mix settings: an existing study must have been made with the same settings (config.json), and a
    folder with evaluations but no config.json has unknown settings."""
    config_path, log_path = study_dir / "config.json", study_dir / "evals.jsonl"
    if not config_path.exists():
        if log_path.exists() and log_path.stat().st_size > 0:
            raise ValueError(f"{study_dir} holds evaluations but no config.json, so the settings they were made with "
                             f"are unknown; move {study_dir} away or use another --out")
        return
    old = json.loads(config_path.read_text())
    new = json.loads(_dumps(config))
    diff = {k: (old.get(k), v) for k, v in new.items()
            if old.get(k) != v and (k in old or v is not None)}  # keys newer than the study: only if set
    if diff:
        raise ValueError(f"{study_dir} holds a study with other settings {diff} (old, new); use another --out "
                         f"or move it away")


@contextlib.contextmanager
def study_lock(study_dir):
    """Hold an exclusive lock on the study folder (its file `lock`) while the block runs; a second process on the
    same folder is refused with a StudyError naming the holder. (No lock where fcntl is missing: Windows.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    f = open(Path(study_dir) / "lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process"
        f.close()
        raise StudyError(f"{study_dir} is in use by another study ({holder}); two processes on one study would "
                           f"write every evaluation twice. Wait for it to finish or stop it, or use another "
                           f"--out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _load_done(log_path):
    """The log's records (cut-off and bad lines handled by read_log) and the trained evaluations by iteration."""
    records = read_log(log_path)
    if records and records[-1]["status"] == "invalid":  # its evaluation's line was cut off: redo both
        while records and records[-1]["status"] == "invalid":
            records.pop()
        write_log(log_path, records)
    done = {}
    for r in records:
        if r["status"] == "invalid":
            continue
        if r["iteration"] in done:
            raise ValueError(f"{log_path} holds evaluation {r['iteration']} twice (two processes wrote it at once?); "
                             f"keep one of its lines, or move the study away")
        done[r["iteration"]] = r
    return records, done


def _next_round(done, iterations, q):
    """(first iteration, size) of the round to run: the unfinished round that holds the first missing evaluation,
    as it was started (its records carry round and round_size), else the next q evaluations."""
    first = min(i for i in range(iterations + len(done) + 1) if i not in done)
    for r in done.values():
        start, size = int(r.get("round", r["iteration"])), int(r.get("round_size", 1))
        if start <= first < start + size:
            return start, size
    return first, max(1, min(q, iterations - first))


def structure_key(model, kw):
    """Jobs with the same key train together: the compartmental network's population structure (POPULATION_SHARED),
    None for the backprop nets (each evaluation alone)."""
    if model != "compartmental":
        return None
    from utils.compartmental import POPULATION_SHARED
    return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(kw.items())
                 if k in POPULATION_SHARED)


def _groups(model, jobs, evaluate):
    """The round's jobs as evaluation groups: compartmental candidates of one structure together."""
    if evaluate is not None or model != "compartmental":
        return [[job] for job in jobs]
    by_key = {}
    for it, kw in jobs:
        by_key.setdefault(structure_key(model, kw), []).append((it, kw))
    return list(by_key.values())


def _run_rounds(model, name, study_dir, space, iterations, init_points, seed, start, q, flip_prob, base, fixed,
                accepts, in_shape, executor, evaluate, verbose):
    """The study's loop: rounds of q proposals evaluated side by side, each logged when it finishes; returns the
    log's records."""
    log_path = study_dir / "evals.jsonl"
    rng = np.random.RandomState(seed)
    optimizer = make_optimizer(space, rng)
    sample = None
    if flip_prob is not None:
        ref = reference_params(model, space)
        sample = flag_sampler(optimizer, rng, {f: ref[f] for f in COMPARTMENTAL_FLAGS}, flip_prob)

    def check(params):
        return check_hyperparameters(model, to_hyperparameters(model, params), in_shape)

    records, done = _load_done(log_path)
    registered = set()

    def register_below(limit):
        for it in sorted(done):
            if it < limit and it not in registered:
                register(optimizer, done[it]["params"], done[it]["target"])
                registered.add(it)

    progress = _Progress(model, name, iterations, done, verbose)
    if verbose and done:
        progress.write(f"[{model}/{name}] resuming {study_dir}: {len(done)} evaluations done")
    while len(done) < iterations:
        first, size = _next_round(done, iterations, q)
        register_below(first)
        picked = propose(optimizer, rng, seed, first, init_points, check, start, size=size, sample=sample)
        meta, jobs = {}, []
        for it, (params, source, rejected, invalid) in enumerate(picked, start=first):
            if it in done:
                continue
            hp = to_hyperparameters(model, params)
            meta[it] = (params, source, rejected, invalid, hp)
            jobs.append((it, {**base, **_seed_kw(accepts, seed + it), **hp, **fixed}))
        for _, results in executor.run(_groups(model, jobs, evaluate)):
            for it, result in results:
                new = _records(model, it, first, size, seed, meta[it], result)
                append_log(log_path, *new)
                records += [json.loads(_dumps(r)) for r in new]
                done[it] = records[-1]
                progress.update(result, done, meta[it][1])
        register_below(first + size)
    progress.close()
    return records


def _records(model, it, first, size, seed, meta, result):
    """The log lines of a finished evaluation: its invalid predecessor (if any) and its record."""
    params, source, rejected, invalid, hp = meta
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    new = []
    if invalid is not None:  # logged with the evaluation that replaced it (one write: both lines or none)
        new.append(dict(iteration=it, status="invalid", target=None, fold_scores=None, params=invalid[0],
                        hyperparameters=to_hyperparameters(model, invalid[0]), seed=None, time_s=0.0,
                        peak_mem_mb=None, mem_kind=None, source="bo", rejected=0, reason=invalid[1], round=first,
                        round_size=size, finished=stamp))
    new.append(dict(iteration=it, status=result["status"], target=result["target"],
                    fold_scores=result["fold_scores"], params=params, hyperparameters=hp, seed=seed + it,
                    time_s=result["time_s"], peak_mem_mb=result["peak_mem_mb"], mem_kind=result["mem_kind"],
                    source=source, rejected=rejected, reason=result["reason"], round=first, round_size=size,
                    population=result.get("population", 1), finished=stamp))
    return new


class _Progress:
    """A tqdm bar per study (evaluations done, best so far, ETA; on a terminal only) and, with verbose, one line per
    finished evaluation."""

    def __init__(self, model, name, iterations, done, verbose):
        from tqdm.auto import tqdm
        self.tag, self.iterations, self.verbose = f"[{model}/{name}]", iterations, verbose
        self.t0, self.n0 = time.perf_counter(), len(done)
        self.bar = tqdm(total=iterations, initial=len(done), desc=f"{model}/{name}", unit="eval",
                        disable=True if not verbose else None, leave=False)

    def write(self, text):
        from tqdm.auto import tqdm
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()

    def update(self, result, done, source):
        best = max(r["target"] for r in done.values())
        self.bar.update(1)
        self.bar.set_postfix(best=f"{best:.4f}")
        if not self.verbose:
            return
        n_new = len(done) - self.n0
        eta = (time.perf_counter() - self.t0) / n_new * (self.iterations - len(done))
        what = (f"cv {result['target']:.4f}" if result["status"] == "ok"
                else f"{result['status']} at chance ({(result['reason'] or '')[:80]})")
        self.write(f"{self.tag} {len(done)}/{self.iterations} {what}  best {best:.4f}  {result['time_s']:.1f} s  "
                   f"ETA {_fmt_time(eta)}  ({source})")

    def close(self):
        self.bar.close()


def _best_record(records):
    ok = [r for r in records if r["status"] == "ok"]
    return max(ok, key=lambda r: r["target"]) if ok else None  # max keeps the first of equal scores


def _retrain(model, ds, best, study_dir, base, fixed, accepts, seed, retrain_subset, test_subset, chance, dev,
             n_evals, verbose, name, executor):
    """Fit the best configuration on the training split, score it on the test split, write best.json."""
    from utils.data import stratified_subset
    path = study_dir / "best.json"
    if path.exists():
        old = json.loads(path.read_text())
        if (old.get("iteration"), old.get("n_evals"), old.get("retrain_subset"), old.get("test_subset")) == \
                (best["iteration"], n_evals, retrain_subset, test_subset):
            return old.get("test_acc")
    X, y, Xt, yt = ds.X_train, ds.y_train, ds.X_test, ds.y_test
    if retrain_subset:
        X, y = stratified_subset(X, y, int(retrain_subset), seed=seed)
    if test_subset:
        Xt, yt = stratified_subset(Xt, yt, int(test_subset), seed=seed)
    kw = {**base, **_seed_kw(accepts, seed), **best["hyperparameters"], **fixed}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    if verbose:
        print(f"[{model}/{name}] retraining the best (#{best['iteration']}, cv {best['target']:.4f}) on {len(y)} "
              f"examples", flush=True)
    result = executor.call(retrain_task, model, kw, (X, y), (Xt, yt), chance,
                           str(dev) if base.get("device") is not None else None)
    test_acc = result["target"] if result["status"] == "ok" else None
    write_json(path, dict(iteration=best["iteration"], n_evals=n_evals, cv_mean=best["target"],
                          hyperparameters=best["hyperparameters"], params=best["params"], test_acc=test_acc,
                          status=result["status"], reason=result["reason"], n_train=len(y), n_test=len(yt),
                          retrain_subset=retrain_subset, test_subset=test_subset, time_s=result["time_s"],
                          peak_mem_mb=result["peak_mem_mb"], mem_kind=result["mem_kind"]))
    return test_acc


def retrain_task(model, kw, train, test, chance, device):
    """Fit make_classifier(model, **kw) on `train`, score it on `test` (run_evaluation's dict); on a worker or here."""
    from utils.data import get_device
    dev = get_device(device)
    (X, y), (Xt, yt) = [tuple(t.to(dev) for t in pair) for pair in (train, test)]

    def fit_and_score(hp):
        clf = make_estimator(model, **hp)
        clf.fit(X, y)
        return [clf.score(Xt, yt)]

    return run_evaluation(fit_and_score, kw, chance, dev)


# ----------------------------------------------------------------------------------------------------------------
# results


def _study_dirs(path):
    path = Path(path)
    if (path / "evals.jsonl").exists():
        return [path]
    return sorted(p.parent for p in path.glob("*/evals.jsonl"))


def load_results(out_dir):
    """Every logged evaluation under `out_dir` (a folder of studies, or one study folder) as a DataFrame: model,
    dataset, iteration, status, target (the objective; chance for failures and invalid proposals), fold_scores, time_s,
    peak_mem_mb, seed, source, reason, params, hyperparameters, test_acc (of the retrained best; NaN if none),
    n_classes (from config.json), and round, round_size, population where the log has them. Readable while the
    study runs (nothing is written; a bad line is skipped with a warning)."""
    import pandas as pd
    rows = []
    for d in _study_dirs(out_dir):
        config = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        model, dataset = config.get("model"), config.get("dataset")
        if model is None:
            model, _, dataset = d.name.partition("_")
        best = json.loads((d / "best.json").read_text()) if (d / "best.json").exists() else {}
        records = read_log(d / "evals.jsonl", repair=False)
        stale = best.get("n_evals") != sum(r["status"] != "invalid" for r in records)
        test_acc = float("nan") if stale or best.get("test_acc") is None else best["test_acc"]
        rows += [{"model": model, "dataset": dataset, **r, "test_acc": test_acc,
                  "n_classes": config.get("n_classes", float("nan"))} for r in records]
    columns = ["model", "dataset", "iteration", "status", "target", "fold_scores", "time_s", "peak_mem_mb", "seed",
               "source", "reason", "params", "hyperparameters", "test_acc", "n_classes"]
    df = pd.DataFrame(rows)
    return df.reindex(columns=columns + [c for c in df.columns if c not in columns])


def summarize(results, include_failures=True):
    """The study table, one row per (model, dataset): best, worst, mean, std (ddof=1) of the cross-validated accuracy
    over the trained evaluations (failures count at chance unless include_failures=False; invalid proposals never
    count), n_evals, n_failed, n_invalid, frac_chance (the fraction of trained evaluations, failures included, that
    scored below AT_CHANCE x chance: networks that did not learn), best_params (hyperparameters of the best) and
    test_acc (the best retrained on the full training split; NaN when not retrained). `results`: a folder (see
    load_results) or its DataFrame."""
    import pandas as pd
    df = results if isinstance(results, pd.DataFrame) else load_results(results)
    columns = ["model", "dataset", "best", "worst", "mean", "std", "n_evals", "n_failed", "n_invalid", "frac_chance",
               "best_params", "test_acc"]
    rows = []
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        scored = g[g.status == "ok"] if not include_failures else g[g.status != "invalid"]
        ok = g[g.status == "ok"]
        best_row = ok.loc[ok.target.idxmax()] if len(ok) else None
        trained = g[g.status != "invalid"]
        n_classes = g.n_classes.iloc[0] if "n_classes" in g else float("nan")
        frac_chance = (float((trained.target < AT_CHANCE / n_classes).mean()) if len(trained) and n_classes > 0
                       else float("nan"))
        rows.append(dict(model=model, dataset=dataset, best=scored.target.max(), worst=scored.target.min(),
                         mean=scored.target.mean(), std=scored.target.std(), n_evals=int((g.status != "invalid").sum()),
                         n_failed=int(g.status.isin(FAILURES).sum()), n_invalid=int((g.status == "invalid").sum()),
                         frac_chance=frac_chance, best_params=None if best_row is None else best_row.hyperparameters,
                         test_acc=g.test_acc.iloc[0] if "test_acc" in g else float("nan")))
    table = pd.DataFrame(rows, columns=columns)
    order = {m: i for i, m in enumerate(SPACES)}
    dorder = {d: i for i, d in enumerate(("mnist", "fashion", "cifar10"))}
    key = table.model.map(lambda m: order.get(m, 99)) * 100 + table.dataset.map(lambda d: dorder.get(d, 99))
    return table.assign(_k=key).sort_values("_k", kind="stable").drop(columns="_k").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m utils.bayes_opt",
                                description="Bayesian optimization of a model's hyperparameters with k-fold "
                                            "cross-validation; resumes from --out when started again.",
                                epilog="The notebooks read finished full studies from logs/full: run the full study "
                                       "with --out logs/full (README, 'The full replication').",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", nargs="+", default=["mlp"], choices=(*SPACES, *rule_models()),
                   help="models to tune (mlp-fa, cnn-sign, ...: the MLP or CNN under another learning rule)")
    p.add_argument("--dataset", nargs="+", default=["mnist"], choices=("mnist", "fashion", "cifar10"),
                   help="datasets, one study per model and dataset")
    p.add_argument("--iterations", type=int, default=50, help="trained evaluations per study")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of every evaluation")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds per evaluation")
    p.add_argument("--out", default="logs", help="studies go to OUT/<model>_<dataset>/")
    p.add_argument("--seed", type=int, default=0, help="seed of the optimizer, folds and models")
    p.add_argument("--subset", type=int, default=None, help="cross-validate on a stratified subset of the training "
                                                            "split")
    p.add_argument("--init-points", type=int, default=5, help="random configurations before the GP proposes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--data-root", default=None, help="default: $BIODL_DATA, else ./data")
    p.add_argument("--batch-size", type=int, default=None, help="fixed batch size (compartmental; the backprop "
                                                                "nets search theirs)")
    p.add_argument("--max-phase", type=int, default=None, help="cap the compartmental phase lengths (reduced runs)")
    p.add_argument("--flip-prob", type=float, default=FLIP_PROB, help="compartmental: probability of flipping each "
                   "option flag of the paper's configuration in random draws (0.5: uniform, as the seed study)")
    p.add_argument("--q", type=int, default=None, help="evaluations per round, run side by side (default: 1 in "
                   "this process, else the cluster's worker threads)")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler, e.g. tcp://host:8786 "
                   "(see README: dask scheduler + one dask worker per GPU)")
    p.add_argument("--workers", type=int, default=None, help="start a local Dask cluster of this many workers "
                   "(0: evaluate in this process; default: one worker per GPU when there are GPUs, else 0)")
    p.add_argument("--threads", type=int, default=None, help="evaluations at once per local worker (default: "
                   "1 per CPU worker, 2 per GPU worker)")
    p.add_argument("--no-retrain", action="store_true", help="skip retraining the best on the full training split")
    p.add_argument("--retrain-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--no-reference", action="store_true", help="make the first evaluation random instead of the "
                                                                "reference configuration (reference())")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--summary", action="store_true", help="only print the table of the studies under --out (also "
                                                          "while they run)")
    args = p.parse_args(argv)
    for name in ("iterations", "epochs", "q", "workers", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            p.error(f"--{name} {value}: give a positive number" + (" (or 0)" if name == "workers" else ""))
    if args.folds < 2:
        p.error(f"--folds {args.folds}: cross-validation needs at least 2 folds")
    if not 0 <= args.flip_prob <= 1:
        p.error(f"--flip-prob {args.flip_prob}: give a probability in [0, 1]")
    try:
        if not args.summary:
            _run_cli_studies(args)
        import pandas as pd
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
            print(summarize(args.out))
    except (ValueError, StudyError) as e:
        sys.exit(f"error: {e}")


class StudyError(RuntimeError):
    """A study that cannot run as asked (folder in use, no cluster); the command line prints it without traceback."""


def _run_cli_studies(args):
    from utils.cluster import ClusterError, gpu_count, start_client
    client = own = None
    workers = args.workers if args.workers is not None else (1 if gpu_count() and args.scheduler is None else 0)
    try:
        if args.scheduler is not None or workers > 0:
            client, own = start_client(args.scheduler, workers=workers or None, threads=args.threads,
                                       verbose=0 if args.quiet else 1)
    except ClusterError as e:
        raise StudyError(str(e)) from None
    try:
        for model in args.model:
            fixed = {"batch_size": args.batch_size} if args.batch_size and model == "compartmental" else None
            for dataset in args.dataset:
                run_study(model, dataset, args.iterations, args.folds, args.epochs, args.out, seed=args.seed,
                          subset=args.subset, device=args.device, init_points=args.init_points, fixed=fixed,
                          max_phase=args.max_phase if model == "compartmental" else None,
                          retrain=not args.no_retrain, retrain_subset=args.retrain_subset,
                          test_subset=args.test_subset, data_root=args.data_root, q=args.q, cluster=client,
                          flip_prob=args.flip_prob, start=None if args.no_reference else "reference",
                          verbose=0 if args.quiet else 1)
    finally:
        if own is not None:
            client.close()
            own.close()


if __name__ == "__main__":
    main()

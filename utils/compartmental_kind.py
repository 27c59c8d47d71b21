"""The compartmental network as a kind (utils.kinds): its estimator, search space, reference configuration, checks,
checkpoint state, command-line options and populations. The network itself: utils.compartmental."""
import inspect
import math

from utils.checkpoint import as_tuples, restore_device
from utils.compartmental import PAPER_F_ETAS, CompartmentalClassifier, batch_f_etas
from utils.compartmental_population import POPULATION_SHARED, fit_population
from utils.compartmental_reference import FLAGS
from utils.kinds import FLAG, MAX_LAYERS, Kind, register

COMPARTMENTAL_FLAGS = tuple(  # the searched CompartmentalClassifier switches: its FLAGS (defined once, in
    f for f in FLAGS if f not in ("extra_steps", "record_backprop_angle")   # compartmental_reference.Config) but two
)

SPACE = {  # the paper's values in comments; times in ms, phases in time steps (see to_hyperparameters)
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
}

# the network's structure: what the members of one population must share (utils.compartmental.fit_population);
# held at the paper's values (hold="structure"), a study searches only its numbers and each round of q candidates
# trains, with their folds, as one population
STRUCTURE = (*COMPARTMENTAL_FLAGS, "dt", "l_f_phase", "l_t_phase", "integration_frac", "n_layers",
             *(f"units_{i}" for i in range(1, MAX_LAYERS + 1)))


def build(logger=None, **hyperparameters):
    """A CompartmentalClassifier; the logger (utils.logger.TrainingLogger) becomes its hook."""
    valid = set(CompartmentalClassifier().get_params())
    unknown = set(hyperparameters) - valid
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)} for 'compartmental'"
                         f"{' (it has per-layer rates f_etas, no lr)' if 'lr' in unknown else ''}; valid: "
                         f"{sorted(valid - {'hook'})}")
    if logger is not None:
        hyperparameters["hook"] = logger
    return CompartmentalClassifier(**hyperparameters)


def reference(batch_size=None):
    """CompartmentalClassifier's defaults (the paper's network and settings) with the paper's learning rates,
    scaled by batch_f_etas for a batch_size > 1, in the space's coordinates."""
    d = CompartmentalClassifier().get_params()
    (eta_hidden, eta_out), sizes = batch_f_etas(batch_size or 1, PAPER_F_ETAS[1]), d["n_hidden"]
    return {**{flag: FLAG[bool(d[flag])] for flag in COMPARTMENTAL_FLAGS},
            **{k: d[k] for k in ("dt", "l_f_phase", "l_t_phase", "lambda_max", "tau_s", "g_B", "g_A", "E_E",
                                 "E_I")},
            "integration_frac": d["integration_time"] / min(d["l_f_phase"], d["l_t_phase"]),
            "tau_delta": d["tau_L"] - d["tau_s"], "log10_f_eta_hidden": math.log10(eta_hidden),
            "log10_f_eta_out": math.log10(eta_out), "n_layers": len(sizes),
            **{f"units_{i}": n for i, n in enumerate(sizes, 1)}}


def to_hyperparameters(p):
    """A point of SPACE -> CompartmentalClassifier's keyword arguments."""
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


def check(hp, in_shape):
    """The estimator's own checks, as a safeguard (to_hyperparameters keeps proposals valid)."""
    CompartmentalClassifier(**hp)._check_params()


def accepts():
    return set(inspect.signature(CompartmentalClassifier.__init__).parameters) - {"self"}


def save_state(est):
    meta = dict(estimator="CompartmentalClassifier", kind="compartmental",
                hyperparameters={k: v for k, v in est.get_params().items() if k != "hook"})
    if not hasattr(est, "W_"):
        return meta, {}
    sd = est.state_dict()                              # the estimator's own state_dict: plain values and tensors
    meta["state"] = dict(sd["meta"], device_type=est.device_.type)
    return meta, sd["tensors"]


def restore(meta, tensors, device):
    params = as_tuples(meta["hyperparameters"])
    params["device"] = restore_device(params["device"], device)
    est = CompartmentalClassifier(**params)
    if meta.get("state") is None:
        return est
    return est.load_state_dict(dict(meta=meta["state"], tensors=tensors))


def default_f_etas(n_hidden, batch_size, n_examples=None):
    """The paper's rates for len(n_hidden) hidden layers, scaled for the batch that trains (batch_size, or the
    n_examples when there are fewer: utils.compartmental.batch_f_etas)."""
    if len(n_hidden) not in PAPER_F_ETAS:
        raise ValueError(f"the paper gives rates for {' or '.join(map(str, PAPER_F_ETAS))} hidden layers, not "
                         f"{len(n_hidden)}; give them with --f-etas (one per hidden layer and one for the output)")
    return batch_f_etas(batch_size, PAPER_F_ETAS[len(n_hidden)], n_examples)


def from_args(args, n_examples=None):
    """(batch size, make_classifier's arguments) from utils.train's command line; with n_examples (the training
    examples), the default rates scaled for the batch that trains and the decay in examples."""
    batch_size = args.batch_size or CompartmentalClassifier().batch_size
    n_hidden = tuple(args.n_hidden or (500,))
    f_etas = tuple(args.f_etas) if args.f_etas else default_f_etas(n_hidden, batch_size, n_examples)
    model = dict(n_hidden=n_hidden, f_etas=f_etas)
    if n_examples is not None:
        model["lr_decay_examples"] = round(args.lr_decay_epochs * n_examples) if args.lr_decay_epochs else None
    return batch_size, model


def prepare_epochs(est, epochs):
    """Nothing to prepare: partial_fit trains one epoch."""


def train_epoch(est, X, y, classes):
    """One more epoch from where training stopped (no training loss)."""
    est.partial_fit(X, y, classes=classes)
    return None


def population(estimators, datasets):
    """Train the estimators side by side, each on its (X, y) of `datasets` (utils.compartmental_population)."""
    return fit_population(estimators, datasets)


KIND = register(Kind(
    name="compartmental", network="compartmental", rule=None, learning="compartmental", build=build,
    owns=lambda est: isinstance(est, CompartmentalClassifier), space=SPACE, reference=reference,
    to_hyperparameters=to_hyperparameters, check=check, accepts=accepts, save_state=save_state, restore=restore,
    prepare_epochs=prepare_epochs, train_epoch=train_epoch,
    cli_options=frozenset({"n_hidden", "f_etas", "lr_decay_epochs"}), from_args=from_args,
    cli_refusals={"lr": "it has per-layer rates, f_etas", "rule": "the compartmental network has its own learning"},
    population=population, shared=POPULATION_SHARED, structure=STRUCTURE, flags=COMPARTMENTAL_FLAGS,
    phases=("l_f_phase", "l_t_phase"), test_steps="l_f_phase_test"), __name__)

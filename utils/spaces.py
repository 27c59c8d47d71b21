"""The search spaces of the Bayesian optimization study (utils.study): the part a researcher edits.

bayes_opt 3.x bounds: (lo, hi) float, (lo, hi, int) integer (inclusive), a list of values categorical. Variable
depth: n_layers / n_blocks plus one entry per possible layer, of which only the first n_layers / n_blocks are used
(to_hyperparameters). Learning rates are searched as log10. The spaces are the seed study's.

    SPACES[model]                  the search space of each model kind ("mlp-fa" ... search the MLP's or CNN's;
                                   "mlp-dtp", "mlp-sdtp", "mlp-pc": the MLP's plus the rule's numbers, RULE_SPACES)
    make_space(model, max_phase)   a copy, the compartmental phases capped for reduced runs
    reference(model)               the first evaluation of a study: the estimator's own defaults
    reference_params(model, space) the same as a complete point of the space
    start_point(model, space, start) a study's `start` setting as a point of the space
    to_hyperparameters(model, p)   a point of the space -> keyword arguments of make_classifier(model)
    check_hyperparameters(...)     None when those can be trained, else the reason
    make_estimator(model, **kw)    the estimator of a study's model name
"""
import math

from utils.compartmental import PAPER_F_ETAS, CompartmentalClassifier, batch_f_etas
from utils.compartmental_reference import FLAGS
from utils.models import cnn_feature_shape
from utils.rules import rule_kinds, rule_models, rule_settings, split_model
from utils.train import CNN_DEFAULTS, COMMON_DEFAULTS, MLP_DEFAULTS, make_classifier

MAX_LAYERS = 6  # MLP and compartmental hidden layers
MAX_BLOCKS = 5  # CNN convolution blocks
LOG10_LR = (-4.0, math.log10(5e-2))  # Adam learning rate 1e-4 .. 5e-2
FLAG = ["off", "on"]  # categorical (a [False, True] pair would be read as the float range 0..1)
FLIP_PROB = 0.05      # compartmental random draws: the paper's flags, each flipped with this probability (the study's
#                       default flip_prob; utils.propose.flag_sampler; 0.5 is the seed study's uniform draw)

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

RULE_SPACES = {  # a learning rule's own numbers, searched beside its kind's (log10_x: the setting x as log10)
    "dtp": {"log10_noise": (-2.0, 0.0),          # sigma: corruption the inverses learn on
            "log10_inverse_lr": (-4.0, -2.0),    # the inverses' Adam rate
            "log10_target_step": (-2.0, 0.0)},   # eta: the first target's step along -dL/dh
    "sdtp": {"log10_noise": (-2.0, 0.0), "log10_inverse_lr": (-4.0, -2.0),
             "log10_target_step": (-1.0, 0.0)},  # eta: the output target's step towards the label (1: the label)
    "pc": {"inference_steps": (5, 50, int),      # T: inference steps per batch (the cost: ~T passes)
           "log10_inference_rate": (-2.0, -0.3),    # gamma: the relaxation's step size (halved where it overshoots)
           "log10_output_weight": (-2.0, 0.0)},     # beta: the energy's output term (small: nearer backprop)
}
SPACES.update({f"{kind}-{rule}": {**SPACES[kind], **own}   # "mlp-dtp": the MLP's space and DTP's numbers
               for rule, own in RULE_SPACES.items() for kind in rule_kinds(rule)})


def _rule_values(model, values):
    """The rule's own numbers of a search-space point `values` -> make_classifier's keyword arguments."""
    own = RULE_SPACES.get(split_model(model)[1], {})
    return {k.removeprefix("log10_"): 10.0 ** float(values[k]) if k.startswith("log10_") else
            int(round(values[k])) if b[-1] is int else values[k] for k, b in own.items()}


def _rule_reference(model):
    """The rule's defaults (utils.rules.rule_settings) in the coordinates of RULE_SPACES."""
    rule = split_model(model)[1]
    own, d = RULE_SPACES.get(rule, {}), rule_settings(rule) if rule else {}
    return {k: math.log10(d[k.removeprefix("log10_")]) if k.startswith("log10_") else d[k] for k in own}


def reference(model, batch_size=None):
    """The study's first evaluation (unless start=None), in the search space's coordinates: the estimator's own
    defaults, so that no study ends below them - make_classifier's for the MLP and CNN, CompartmentalClassifier's
    (the paper's network and settings) with the paper's learning rates for the compartmental model, scaled by
    batch_f_etas for a batch_size > 1. Read from those defaults, so that the two never drift apart."""
    own, model = _rule_reference(model), split_model(model)[0]   # "mlp-fa": the MLP's space (+ the rule's numbers)
    if model in ("mlp", "cnn"):
        ref = dict(batch_size=COMMON_DEFAULTS["batch_size"], log10_lr=math.log10(COMMON_DEFAULTS["lr"]), **own)
        if model == "mlp":
            sizes = MLP_DEFAULTS["hidden_sizes"]
            return {**ref, "n_layers": len(sizes), **{f"units_{i}": n for i, n in enumerate(sizes, 1)}}
        d = CNN_DEFAULTS
        return {**ref, "n_blocks": len(d["channels"]), "stride": d["stride"], "padding": d["padding"],
                **{f"channels_{i}": c for i, c in enumerate(d["channels"], 1)},
                **{f"kernel_{i}": k for i, k in enumerate(d["kernel_sizes"], 1)}}
    if model == "compartmental":
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


def start_point(model, space, start, batch_size=None):
    """A study's first evaluation as a complete point of `space`: start="reference" -> reference_params (the
    compartmental rates scaled for `batch_size`), a dict -> itself (checked to set every parameter), None -> None."""
    if isinstance(start, str):
        if start != "reference":
            raise ValueError(f"start={start!r}: use 'reference', None, or a dict of search-space parameters")
        return reference_params(model, space, batch_size)
    if start is not None:
        unknown, missing = set(start) - set(space), set(space) - set(start)
        if unknown or missing:
            raise ValueError(f"start must set every parameter of the {model} search space: unknown {sorted(unknown)}"
                             f", missing {sorted(missing)}")
    return start


# the compartmental network's structure: what the members of one population must share (utils.compartmental.
# fit_population); held at the paper's values (hold="structure"), a study searches only its numbers and each
# round of q candidates trains, with their folds, as one population
STRUCTURE = (*COMPARTMENTAL_FLAGS, "dt", "l_f_phase", "l_t_phase", "integration_frac", "n_layers",
             *(f"units_{i}" for i in range(1, MAX_LAYERS + 1)))


def held_params(model, hold, max_phase=None, batch_size=None):
    """The space parameters a study holds at the reference configuration (reference_params), removed from its search:
    hold = None (none), "structure" (the compartmental STRUCTURE) or a list of parameter names."""
    if not hold:
        return {}
    names = STRUCTURE if hold == "structure" else tuple(hold)
    if hold == "structure" and split_model(model)[0] != "compartmental":
        raise ValueError("hold='structure' applies to the compartmental model; give parameter names for the others")
    full = make_space(model, max_phase)
    unknown = sorted(set(names) - set(full))
    if unknown:
        raise ValueError(f"hold: {unknown} are not parameters of the {model} search space ({', '.join(full)})")
    ref = reference_params(model, full, batch_size)
    return {k: ref[k] for k in names}


def make_space(model, max_phase=None, held=()):
    """The search space of `model` (a copy of SPACES[model]) without the `held` parameters; max_phase caps the
    compartmental phase lengths (reduced runs only: the phases are still searched, within [lower bound, max_phase])."""
    if split_model(model)[0] not in SPACES:   # "mlp-fa" ...: the kind's space; "mlp-dtp": its own (RULE_SPACES)
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(dict.fromkeys([*SPACES, *rule_models()]))}")
    space = {k: v for k, v in SPACES.get(model, SPACES[split_model(model)[0]]).items() if k not in held}
    if max_phase is not None:
        if model != "compartmental":
            raise ValueError("max_phase only applies to the compartmental model")
        for key in ("l_f_phase", "l_t_phase"):
            if key not in space:
                continue
            lo, hi, typ = space[key]
            if max_phase < lo:
                raise ValueError(f"max_phase={max_phase} is below the lower bound {lo} of {key}")
            space[key] = (lo, min(hi, int(max_phase)), typ)
    return space


def to_hyperparameters(model, params):
    """Optimizer parameters (one flat dict of floats/ints/bools) -> keyword arguments of make_classifier(model)."""
    own, model = _rule_values(model, params), split_model(model)[0]   # make_classifier adds the rule
    p = params
    if model == "mlp":
        return dict(hidden_sizes=tuple(int(p[f"units_{i}"]) for i in range(1, int(p["n_layers"]) + 1)),
                    lr=10.0 ** float(p["log10_lr"]), batch_size=int(p["batch_size"]), **own)
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
    return make_classifier(model, **kw)


def check_hyperparameters(model, hp, in_shape):
    """None when make_classifier(model, **hp) can be trained on inputs of shape in_shape (C, H, W), else the reason.
    Only the CNN has proposals that are invalid by construction (a block whose output is empty or fractional); the
    compartmental ones are checked against the estimator's own validation as a safeguard."""
    model = split_model(model)[0]   # "mlp-fa" searches the MLP's space; make_classifier adds the rule
    try:
        if model == "cnn":
            cnn_feature_shape(in_shape, hp["channels"], hp["kernel_sizes"], hp["stride"], hp["padding"])
        elif model == "compartmental":  # the estimator's own checks (to_hyperparameters keeps proposals valid)
            CompartmentalClassifier(**hp)._check_params()
    except ValueError as e:
        return str(e)
    return None

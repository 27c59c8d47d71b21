"""The search spaces of the Bayesian optimization study (utils.study), as each kind describes them (utils.kinds:
the MLP's and CNN's in utils.classifiers, the compartmental network's in utils.compartmental_kind).

bayes_opt 3.x bounds: (lo, hi) float, (lo, hi, int) integer (inclusive), a list of values categorical. Variable
depth: n_layers / n_blocks plus one entry per possible layer, of which only the first n_layers / n_blocks are used
(to_hyperparameters). Learning rates are searched as log10. The spaces are the seed study's.

    SPACES[model]                  the search space of each network and of each rule with numbers of its own
                                   ("mlp-fa" ... search the MLP's or CNN's; "mlp-dtp": the MLP's plus DTP's)
    make_space(model, max_phase)   a copy, the phases capped for reduced runs
    reference(model)               the first evaluation of a study: the estimator's own defaults
    reference_params(model, space) the same as a complete point of the space
    start_point(model, space, start) a study's `start` setting as a point of the space
    to_hyperparameters(model, p)   a point of the space -> keyword arguments of make_classifier(model)
    check_hyperparameters(...)     None when those can be trained, else the reason
"""
from utils.kinds import all_kinds, get_kind

FLIP_PROB = 0.05      # compartmental random draws: the paper's flags, each flipped with this probability (the study's
#                       default flip_prob; utils.propose.flag_sampler; 0.5 is the seed study's uniform draw)

SPACES = {k.name: k.space for k in all_kinds() if k.rule is None or k.rule_space}


def reference(model, batch_size=None):
    """The study's first evaluation (unless start=None), in the search space's coordinates: the estimator's own
    defaults, so that no study ends below them - make_classifier's for the MLP and CNN, CompartmentalClassifier's
    (the paper's network and settings) with the paper's learning rates for the compartmental model, scaled by
    batch_f_etas for a batch_size > 1. Read from those defaults, so that the two never drift apart."""
    return get_kind(model).reference(batch_size)


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


def held_params(model, hold, max_phase=None, batch_size=None):
    """The space parameters a study holds at the reference configuration (reference_params), removed from its search:
    hold = None (none), "structure" (the kind's structure: the compartmental network's) or a list of parameter names."""
    if not hold:
        return {}
    structure = get_kind(model).structure
    names = structure if hold == "structure" else tuple(hold)
    if hold == "structure" and not structure:
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
    kind = get_kind(model)   # "mlp-fa" ...: the MLP's space; "mlp-dtp": the MLP's and DTP's numbers
    space = {k: v for k, v in kind.space.items() if k not in held}
    if max_phase is not None:
        if not kind.phases:
            raise ValueError("max_phase only applies to the compartmental model")
        for key in kind.phases:
            if key not in space:
                continue
            lo, hi, typ = space[key]
            if max_phase < lo:
                raise ValueError(f"max_phase={max_phase} is below the lower bound {lo} of {key}")
            space[key] = (lo, min(hi, int(max_phase)), typ)
    return space


def to_hyperparameters(model, params):
    """Optimizer parameters (one flat dict of floats/ints/bools) -> keyword arguments of make_classifier(model)."""
    return get_kind(model).to_hyperparameters(params)


def check_hyperparameters(model, hp, in_shape):
    """None when make_classifier(model, **hp) can be trained on inputs of shape in_shape (C, H, W), else the reason.
    Only the CNN has proposals that are invalid by construction (a block whose output is empty or fractional); the
    compartmental ones are checked against the estimator's own validation as a safeguard."""
    try:
        get_kind(model).check(hp, in_shape)
    except ValueError as e:
        return str(e)
    return None

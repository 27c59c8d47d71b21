"""One description per kind of model: what train, study, cluster, checkpoint, workspace and the logger ask.

    from utils.kinds import get_kind
    kind = get_kind("mlp-fa")             # the MLP learning by feedback alignment
    clf = kind.build(logger=None, hidden_sizes=(100,))
    kind.to_hyperparameters(point)        # a point of kind.space -> build's keyword arguments

A Kind is filled in beside its model: utils.classifiers registers the MLP and the CNN under every rule that applies
to them, utils.compartmental_kind the compartmental network. A model name is a kind ("mlp", "cnn",
"compartmental") or a kind under a rule ("mlp-fa", "mlp-dtp", ...: utils.rules.split_model).

Why a registry and not a protocol on the estimator classes: most of a description is no estimator's business (a
search space, a reference point, the study's options, the command line's), several names share one estimator class
(the MLP and CNN under every rule are TorchClassifiers), and code that has only a name (a study's log, a checkpoint's
meta, the command line) needs the description before any estimator exists.
"""
import dataclasses
import importlib
from typing import Callable

from utils.rules import split_model

# the modules that register kinds, imported on the first question (they import this module)
KIND_MODULES = ("utils.classifiers", "utils.compartmental_kind")

# conventions of the search spaces that every kind's space follows
MAX_LAYERS = 6  # MLP and compartmental hidden layers
MAX_BLOCKS = 5  # CNN convolution blocks
FLAG = ["off", "on"]  # categorical (a [False, True] pair would be read as the float range 0..1)


@dataclasses.dataclass(frozen=True, eq=False)   # compared and hashed by identity: one object per kind
class Kind:
    """A kind of model. Spaces map a parameter to (lo, hi), (lo, hi, int) or a list of categories."""
    name: str                     # the model name: "mlp", "mlp-fa", "compartmental"
    network: str                  # the network it trains: "mlp", "cnn", "compartmental"
    rule: str | None              # the learning rule of the name (None: the network's own)
    learning: str                 # how it learns: "backprop", a rule of utils.rules, or the network's own name
    build: Callable               # build(logger=None, **hyperparameters) -> an unfitted estimator, the logger attached
    owns: Callable                # owns(estimator) -> whether the estimator is one of this network
    space: dict                   # the search space
    reference: Callable           # reference(batch_size) -> the estimator's defaults in the space's coordinates
    to_hyperparameters: Callable  # a point of the space -> build's keyword arguments
    check: Callable               # check(hp, in_shape): ValueError when build(**hp) cannot train on in_shape inputs
    accepts: Callable             # () -> keyword names build takes beyond the searched ones (seed, device...)
    save_state: Callable          # save_state(estimator) -> (meta, tensors) of a checkpoint (utils.checkpoint)
    restore: Callable             # restore(meta, tensors, device) -> the estimator save_state saw
    cli_options: frozenset        # options of `python -m utils.train` that apply (utils.train._usage)
    from_args: Callable           # from_args(args, n_examples=None) -> (batch size, build's arguments); ValueError
    prepare_epochs: Callable      # prepare_epochs(estimator, epochs): before training epoch by epoch up to `epochs`
    train_epoch: Callable         # train_epoch(estimator, X, y, classes) -> one more epoch; its training loss or None
    cli_refusals: dict = dataclasses.field(default_factory=dict)   # option -> why it does not apply (for the error)
    population: Callable | None = None   # fit_population(estimators, data): several train at once (else in turn)
    shared: tuple = ()            # hyperparameters the members of one population share (population only)
    structure: tuple = ()         # space parameters that a study may hold at the reference (hold="structure")
    flags: tuple = ()             # categorical space parameters that random draws flip (a study's flip_prob)
    phases: tuple = ()            # space parameters capped by a study's max_phase
    test_steps: str | None = None  # the hyperparameter of the cost of scoring one example (time steps), if any
    rule_space: dict = dataclasses.field(default_factory=dict)   # the rule's own part of `space`

    @property
    def searches_batch_size(self):
        """Whether the space holds the batch size (else a study fixes it)."""
        return "batch_size" in self.space

    def group_key(self, hp):
        """Evaluations with the same key may train as one population; None: each alone."""
        if self.population is None:
            return None
        return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(hp.items())
                     if k in self.shared)


_KINDS = {}   # name -> (Kind, the module of KIND_MODULES that registered it)


def register(kind, module):
    """Add `kind` to the registry (the model module `module`, one of KIND_MODULES, calls it at import); returns it."""
    if module not in KIND_MODULES:
        raise ValueError(f"{module} registers a kind but is not in utils.kinds.KIND_MODULES")
    _KINDS[kind.name] = (kind, module)
    return kind


def _loaded():
    """name -> Kind, every model module imported: in the order of KIND_MODULES, whatever was imported first."""
    for module in KIND_MODULES:
        importlib.import_module(module)
    ranked = sorted(_KINDS.items(), key=lambda item: KIND_MODULES.index(item[1][1]))   # stable: registration order
    return {name: kind for name, (kind, _) in ranked}


def all_kinds():
    """Every registered kind: the networks first, then the networks under other rules; each in KIND_MODULES' and
    then registration order."""
    kinds = list(_loaded().values())
    return [k for k in kinds if k.rule is None] + [k for k in kinds if k.rule is not None]


def networks():
    """The names of the networks ("mlp", "cnn", "compartmental")."""
    return tuple(k.name for k in all_kinds() if k.rule is None)


def find_kind(model):
    """The Kind of a model name, None when none is registered (ValueError for an unknown rule in the name);
    "mlp-backprop" is the MLP."""
    network, rule = split_model(model)
    return _loaded().get(network if rule == "backprop" else str(model))


def get_kind(model):
    """The Kind of a model name; ValueError naming the valid ones when there is none."""
    kind = find_kind(model)
    if kind is None:
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(k.name for k in all_kinds())}")
    return kind


def kind_of(estimator, strict=True):
    """The network Kind of an estimator (its rule lives in its hyperparameters); for a foreign one (a test's fake),
    ValueError, or None when not `strict`."""
    for kind in all_kinds():
        if kind.rule is None and kind.owns(estimator):
            return kind
    if strict:
        raise ValueError(f"{type(estimator).__name__} is no estimator of a registered kind")
    return None

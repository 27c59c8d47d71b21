"""Learning rules other than backpropagation for the MLP and the CNN: only the backward pass differs.

    from utils.models import MLP
    net = MLP(784, (500,), 10, rule="fa")              # "backprop" (default), "fa", "dfa", "sign"; MLP: "dtp", ...
    hidden_angles(net, X, y, torch.nn.CrossEntropyLoss())   # {"hidden1": degrees} to backprop's gradient
    make_classifier("mlp-fa")  ==  make_classifier("mlp", rule="fa")   # the study's model names (split_model)

Every weight layer of the two networks is a `RuleLinear` or `RuleConv2d` (subclasses of nn.Linear / nn.Conv2d with
the same forward pass and the same initialisation, except FA's and DFA's zero output layer, see below). The rule sets the signal a layer sends back to its input:

* ``"backprop"``: W^T delta (plain autograd).
* ``"fa"``, feedback alignment (Lillicrap et al. 2016, Nature Communications 7:13276): B^T delta for a fixed random
  matrix B of W's shape (convolutions: the transposed convolution with a fixed random kernel B).
* ``"dfa"``, direct feedback alignment (Nøkland 2016, NeurIPS): the output error e = dL/d(logits) sent to every
  hidden layer through one fixed random matrix per hidden layer, B_l of shape (n_classes, units of layer l): the
  layer after hidden layer l sends e B_l back, whatever its own delta is.
* ``"sign"``, sign symmetry (Liao, Leibo & Poggio 2016; Xiao et al. 2018): (sign(W) * s)^T delta, the forward
  weights' signs with one fixed magnitude s per layer.
* The network rules, on the MLP only: ``"dtp"`` and ``"sdtp"``, difference target propagation and its simplified
  form (utils.target_prop), and ``"pc"``, predictive coding (utils.predictive_coding). The forward pass is the
  MLP's; its backward pass (`rule_forward`) hands the rule's learner the activities and the output error dL/dz and
  returns the rule's whole update as the weights' gradients, so the estimator's optimizer, the logger's angle and
  the checkpoints treat them as the others. Their settings (DTP's noise, PC's inference_steps...): rule_settings.

Each layer's own weight update is delta x^T as in backprop, so the output layer learns exactly as with backprop and
the hidden layers differ only through the delta that reaches them. The first layer sends nothing back (its input
needs no gradient), so it holds no feedback matrix.

Why the feedback has the scale it has, and why FA's and DFA's output layer starts at zero: reset_feedback_ and
init_rule_. The feedback matrices are buffers (`feedback`): in the state dict, in checkpoints, moved with the
module, never touched by the optimizer. Sign symmetry needs no buffer (the signs are read from W at each backward pass).
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from utils.predictive_coding import PredictiveCoding
from utils.target_prop import DTP, SDTP

LAYER_RULES = ("fa", "dfa", "sign")   # rules that live in each layer's backward pass (RuleLinear / RuleConv2d)
NETWORK_RULES = {"dtp": DTP, "sdtp": SDTP, "pc": PredictiveCoding}   # rules that see the whole MLP (rule_forward)
RULES = ("backprop", *LAYER_RULES, *NETWORK_RULES)
ZERO_OUTPUT_RULES = ("fa", "dfa")   # rules whose output layer starts at zero (module docstring)


def rule_kinds(rule):
    """The model kinds `rule` applies to: every rule the MLP, the layer rules the CNN too."""
    return ("mlp",) if rule in NETWORK_RULES else ("mlp", "cnn")


def rules_for(kind):
    """The rules of `kind` ("mlp", "cnn"), backprop first."""
    return tuple(rule for rule in RULES if kind in rule_kinds(rule))


def rule_models(kinds=("mlp", "cnn")):
    """The model names a study compares besides the kinds themselves: "mlp-fa", "mlp-dfa", ..., "cnn-sign"."""
    return [f"{kind}-{rule}" for kind in kinds for rule in rules_for(kind) if rule != "backprop"]


def split_model(model):
    """A model name -> (kind, rule): "mlp-fa" -> ("mlp", "fa"); a plain kind -> (kind, None). The one place where
    the study's model names meet the rules."""
    kind, _, rule = str(model).partition("-")
    if rule and rule not in RULES:
        raise ValueError(f"unknown learning rule {rule!r} in model {model!r}; valid rules: {', '.join(RULES)}")
    if rule:
        check_rule(rule, kind)
    return kind, rule or None


def check_rule(rule, kind=None):
    """`rule` when it is a rule (of `kind`, when given), else a ValueError naming the valid ones."""
    if rule not in RULES:
        raise ValueError(f"unknown learning rule {rule!r}; valid rules: {', '.join(RULES)}")
    if kind is not None and kind in ("mlp", "cnn") and kind not in rule_kinds(rule):
        raise ValueError(f"learning rule {rule!r} is defined for the {', '.join(rule_kinds(rule))} only, not the "
                         f"{kind}; the {kind}'s rules: {', '.join(rules_for(kind))}")
    return rule


def rule_settings(rule):
    """The settings a rule takes beyond the network's and their defaults ({} for backprop and the layer rules):
    DTP's and SDTP's noise, inverse_lr, target_step; predictive coding's inference_steps, inference_rate, ..."""
    learner = NETWORK_RULES.get(check_rule(rule))
    return {} if learner is None else dataclasses.asdict(learner.config())


class OutputError:
    """The output error e = dL/d(logits) of the current backward pass, shared by a network's DFA layers.

    The output layer's backward pass runs first and stores e; the hidden layers read it. It is not pickled (a
    saved network holds no stale error)."""

    def __init__(self):
        self.error = None

    def __getstate__(self):
        return {"error": None}

    def __setstate__(self, state):
        self.error = None


def _xavier_bound(fan_in, fan_out):
    return math.sqrt(6.0 / (fan_in + fan_out))


def _fans(weight):
    return nn.init._calculate_fan_in_and_fan_out(weight)


# ----------------------------------------------------------------------------------------------------------------
# the backward passes


@dataclasses.dataclass(frozen=True)
class Wiring:
    """A rule layer's place in its network: its `rule`, whether it `sends_back` a signal to its input (False for the
    first layer: its input needs no gradient), whether it `is_output` (the network's last layer), and, for DFA,
    `n_classes` and the network's `shared` OutputError."""
    rule: str = "backprop"
    sends_back: bool = True
    is_output: bool = False
    n_classes: int = None
    shared: OutputError = None


def _input_signal(wiring, scale, grad_out, weight, feedback):
    """The kernel whose transpose carries grad_out back (FA / sign), or, for DFA, None after storing e."""
    if wiring.rule == "fa":
        return feedback
    if wiring.rule == "sign":
        return torch.sign(weight) * scale
    if wiring.is_output:  # dfa: the output layer's delta is the output error
        wiring.shared.error = grad_out
    return None


def _dfa_input_grad(shared, feedback, x_shape):
    if shared.error is None:
        raise RuntimeError("direct feedback alignment: no output error stored; the network's last layer must be "
                           "its output layer (is_output=True)")
    return (shared.error.flatten(1) @ feedback).view(x_shape)


class _RuleLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, wiring, scale):
        ctx.save_for_backward(x, weight, feedback)
        ctx.wiring, ctx.scale, ctx.has_bias = wiring, scale, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, feedback = ctx.saved_tensors
        kernel = _input_signal(ctx.wiring, ctx.scale, grad_out, weight, feedback)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            dfa = ctx.wiring.rule == "dfa"
            grad_x = _dfa_input_grad(ctx.wiring.shared, feedback, x.shape) if dfa else grad_out @ kernel
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


class _RuleConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, wiring, scale, conv):
        """`conv`: (stride, padding, dilation, groups) of the layer."""
        ctx.save_for_backward(x, weight, feedback)
        ctx.wiring, ctx.scale, ctx.conv = wiring, scale, conv
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return F.conv2d(x, weight, bias, *conv)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, feedback = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        kernel = _input_signal(ctx.wiring, ctx.scale, grad_out, weight, feedback)
        dfa = ctx.wiring.rule == "dfa"
        need_x = ctx.needs_input_grad[0]
        mask = [need_x and not dfa, ctx.needs_input_grad[1], ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        # one call: the input gradient through `kernel` (FA, sign) and the weight gradient from x, as backprop's
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, weight if kernel is None else kernel, ctx.bias_sizes, list(stride), list(padding),
            list(dilation), False, [0, 0], groups, mask)
        if need_x and dfa:
            grad_x = _dfa_input_grad(ctx.wiring.shared, feedback, x.shape)
        return grad_x, grad_w, grad_b, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# layers


class _RuleLayer:
    """What RuleLinear and RuleConv2d share: the wiring (the rule...), the feedback buffer and its drawing."""

    def _setup_rule(self, wiring, in_numel):
        check_rule(wiring.rule)
        self.wiring = wiring
        fan_in, fan_out = _fans(self.weight)
        self.scale = math.sqrt(2.0 / (fan_in + fan_out))   # sign symmetry's fixed magnitude
        rule, shape = wiring.rule, None
        if rule == "fa" and wiring.sends_back:
            shape = tuple(self.weight.shape)
        elif rule == "dfa" and wiring.sends_back:
            if wiring.n_classes is None or in_numel is None or wiring.shared is None:
                raise ValueError("a DFA layer that sends an error back needs n_classes, in_numel and the network's "
                                 "shared OutputError")
            shape = (int(wiring.n_classes), int(in_numel))
        if rule == "dfa" and wiring.is_output and wiring.shared is None:
            raise ValueError("the DFA output layer needs the network's shared OutputError")
        self.register_buffer("feedback", None if shape is None else torch.empty(shape))

    @property
    def rule(self):
        return self.wiring.rule

    def reset_feedback_(self):
        """Draw the fixed feedback matrix (see the module docstring for its scale) from torch's global generator."""
        if self.feedback is None:
            return
        with torch.no_grad():
            if self.rule == "fa":
                fan_in, fan_out = _fans(self.weight)
            else:  # dfa: a layer from the n_classes outputs to the in_numel units of the previous hidden layer
                fan_in, fan_out = self.feedback.shape
            a = _xavier_bound(fan_in, fan_out)
            self.feedback.uniform_(-a, a)

    def _rule_args(self):
        return self.feedback, self.wiring, self.scale

    def extra_repr(self):
        return super().extra_repr() + f", rule={self.rule}"


class RuleLinear(_RuleLayer, nn.Linear):
    """nn.Linear whose backward pass follows `rule` (see the module docstring)."""

    def __init__(self, in_features, out_features, wiring=Wiring()):
        nn.Linear.__init__(self, in_features, out_features)
        self._setup_rule(wiring, in_features)

    def forward(self, x):
        if self.rule not in LAYER_RULES:   # backprop; the network rules compute the MLP's pass themselves
            return F.linear(x, self.weight, self.bias)
        return _RuleLinearFn.apply(x, self.weight, self.bias, *self._rule_args())


class RuleConv2d(_RuleLayer, nn.Conv2d):
    """nn.Conv2d (zero padding) whose backward pass follows `rule`; `in_shape` (C, H, W) sizes DFA's matrix."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, wiring=Wiring(), in_shape=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding)
        self._setup_rule(wiring, None if in_shape is None else math.prod(in_shape))

    def forward(self, x):
        if self.rule not in LAYER_RULES:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return _RuleConv2dFn.apply(x, self.weight, self.bias, *self._rule_args(),
                                   (self.stride, self.padding, self.dilation, self.groups))


def rule_layers(module):
    """The module's RuleLinear / RuleConv2d layers in forward order (the last is the output layer)."""
    return [m for m in module.modules() if isinstance(m, _RuleLayer)]


def reset_feedback_(module):
    """Draw every feedback matrix of `module` (after its forward weights, from torch's global generator).

    Scale of the feedback (fixed at construction, drawn from torch's global generator after the forward weights, so a
    run's seed gives the same forward weights under every rule and the feedback matrices of that seed):

    * FA: B is drawn as the forward weights are, Xavier-uniform U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) of the
      layer, i.e. a scale comparable to the forward weights': Lillicrap et al. (2016) draw B from a uniform
      distribution of the forward weights' order (the range is set per task there), Xiao et al. (2018) initialise FA's
      feedback weights like the forward ones.
    * DFA: B_l ~ U(-a, a) with a = sqrt(6 / (n_classes + units of layer l)), Xavier-uniform for a layer from the
      output straight to hidden layer l (Nøkland 2016 draws B_l uniformly at random, of the order of 1/sqrt(fan);
      his exact per-experiment ranges are not reproduced).
    * Sign symmetry: s = sqrt(2 / (fan_in + fan_out)), the standard deviation of the layer's Xavier initialisation, so
      the feedback starts at the forward weights' scale (Liao et al. 2016 show the magnitudes do not matter when the
      updates are normalised, as Adam's are; Xiao et al. 2018 use fixed magnitudes too).

    With Adam (what make_classifier trains with) the scale of a feedback matrix does not matter at all: multiplying
    every B by c > 0 multiplies each hidden layer's gradient by a constant, which Adam's per-parameter normalisation
    removes (up to its epsilon; tests/test_rules.py checks it). The scale was therefore not why FA and DFA lagged.
    """
    for layer in rule_layers(module):
        layer.reset_feedback_()
    return module


def init_rule_(module):
    """The rule's part of a network's initialisation, after its forward weights: draw every feedback matrix and,
    under FA and DFA (ZERO_OUTPUT_RULES), set the output layer's weights to zero.

    Every other weight is the seed's Xavier draw, as under backprop and sign symmetry. The reason is alignment: FA
    and DFA learn because the forward weights above a hidden layer come to align with its feedback matrix, through
    the component that learning adds to them; a random initial output layer is a component uncorrelated with B that
    learning must first outgrow. Under Adam, which moves every weight at the same per-parameter rate, the wide
    hidden layers then drift along B's directions much faster than the output layer can align, the hidden activity
    and the logits grow, and the loss rises above its starting value (docs/results.md, "Measurements moved from the
    code"; a lower learning rate does not help, as the two rates scale together). From a zero output layer the
    learned component is all there is and the angles fall below 90 degrees from the first steps (Nøkland 2016 shows
    DFA training even from all-zero weights). Zero is not used for the hidden layers: with ReLU a zero layer passes
    no gradient.
    """
    reset_feedback_(module)
    layers = rule_layers(module)
    if layers and layers[-1].rule in ZERO_OUTPUT_RULES:
        with torch.no_grad():
            layers[-1].weight.zero_()
    return module


def module_rule(module):
    """The rule of a network built from rule layers (None when it has none)."""
    layers = rule_layers(module)
    return layers[0].rule if layers else None


# ----------------------------------------------------------------------------------------------------------------
# the network rules (DTP, SDTP, predictive coding): the MLP's forward pass, the rule's updates as its backward pass


def make_learner(rule, sizes, n_classes, **settings):
    """The learner of a network rule for an MLP of layer sizes `sizes` (input, hidden...) and `n_classes` outputs
    (an nn.Module: DTP's inverses, predictive coding's inference), or None for backprop and the layer rules."""
    valid = rule_settings(rule)
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for learning rule {rule!r}; valid: {sorted(valid) or 'none'}")
    return NETWORK_RULES[rule](sizes, n_classes, **settings) if rule in NETWORK_RULES else None


class _NetworkRuleFn(torch.autograd.Function):
    """The MLP's forward pass (linear layers, ReLU between them) whose backward pass hands the learner the input,
    the pre-activations and the output error dL/dz, and returns the learner's updates as the gradients."""

    @staticmethod
    def forward(ctx, learner, n_layers, x, *params):
        pre, h = [], x
        for W, b in zip(params[0:2 * n_layers:2], params[1:2 * n_layers:2]):
            pre.append(F.linear(h, W, b))
            h = torch.relu(pre[-1])
        ctx.learner, ctx.n_layers = learner, n_layers
        ctx.save_for_backward(x, *pre, *params)
        return pre[-1]

    @staticmethod
    def backward(ctx, error):
        n = ctx.n_layers
        x, pre, params = ctx.saved_tensors[0], list(ctx.saved_tensors[1:1 + n]), ctx.saved_tensors[1 + n:]
        grads = ctx.learner.updates(list(params[0:2 * n:2]), list(params[1:2 * n:2]), x, pre, error)
        return (None, None, None, *grads)


def rule_forward(module, x):
    """The MLP `module`'s logits for x (its `net` of rule layers and ReLUs); under a network rule, with grad enabled
    and the layers not switched to backprop (hidden_angles), through the rule's backward pass."""
    learner, layers = getattr(module, "learner", None), rule_layers(module)
    if learner is None or not torch.is_grad_enabled() or layers[-1].rule == "backprop":
        return module.net(x)
    params = [p for layer in layers for p in (layer.weight, layer.bias)] + list(learner.parameters())
    return _NetworkRuleFn.apply(learner, len(layers), x.flatten(1), *params)


def rule_param_groups(module, lr):
    """The optimizer's parameter groups when the module's learner trains its own parameters at its own rate
    (`inverse_lr`: DTP's inverses), else None (one group at `lr`)."""
    learner = getattr(module, "learner", None)
    own = [] if learner is None else list(learner.parameters())
    if not own:
        return None
    ids = {id(p) for p in own}
    rest = [p for p in module.parameters() if id(p) not in ids]
    return [{"params": rest, "lr": lr}, {"params": own, "lr": learner.inverse_lr}]


# ----------------------------------------------------------------------------------------------------------------
# the angle between a rule's hidden-layer update and backprop's


def angle_degrees(a, b):
    """Angle between two tensors seen as vectors, in degrees: 2 atan2(|u - v|, |u + v|) for the unit vectors u, v
    (exactly 0 for equal tensors, accurate near 0 and 180; NaN when either is zero)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    u, v = a / na, b / nb
    return math.degrees(2 * math.atan2(float(torch.linalg.vector_norm(u - v)), float(torch.linalg.vector_norm(u + v))))


def _hidden_grads(module, X, y, loss_fn):
    weights = [layer.weight for layer in rule_layers(module)[:-1]]
    loss = loss_fn(module(X), y)
    return torch.autograd.grad(loss, weights)


def hidden_angles(module, X, y, loss_fn, skip_backprop=False):
    """{"hidden1": degrees, ...}: angle between each hidden layer's weight update under the module's rule and the
    backprop gradient, both from the current weights on the batch (X, y) (the raw gradients, before the optimizer).

    Every layer but the output one counts as hidden (its update is backprop's under every rule). Batch-norm running
    statistics and torch's random generators are restored afterwards and no parameter's .grad is touched. {} for a module without rule layers.
    skip_backprop: for rule "backprop" return the angles, 0, without computing them (the logger's default: no cost
    for the backprop nets).
    """
    layers = rule_layers(module)
    if len(layers) < 2:
        return {}
    if skip_backprop and all(layer.rule == "backprop" for layer in layers):
        return {f"hidden{i + 1}": 0.0 for i in range(len(layers) - 1)}
    buffers = {k: v.clone() for k, v in module.named_buffers() if not k.endswith("feedback")}
    wirings = [layer.wiring for layer in layers]
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
    try:   # torch's generators as they were (DTP's corruption draws from them): a logged run trains as an unlogged one
        with torch.enable_grad(), torch.random.fork_rng(devices=cuda):
            own = _hidden_grads(module, X, y, loss_fn)
            for layer in layers:
                layer.wiring = dataclasses.replace(layer.wiring, rule="backprop")
            bp = _hidden_grads(module, X, y, loss_fn)
    finally:
        for layer, wiring in zip(layers, wirings):
            layer.wiring = wiring
        with torch.no_grad():
            for k, v in module.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])
    return {f"hidden{i + 1}": angle_degrees(g, b) for i, (g, b) in enumerate(zip(own, bp))}

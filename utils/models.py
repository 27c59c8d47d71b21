"""Backpropagation baselines: a multilayer perceptron and a convolutional network.

    from utils.models import MLP, CNN, cnn_feature_shape
    MLP(784, (500,), 10);  CNN((1, 28, 28), channels=(32, 64), kernel_sizes=(3, 3), stride=1, padding=1, n_classes=10)
    MLP(784, (500,), 10, rule="fa")     # the learning rule: "backprop" (default), "fa", "dfa", "sign", "dtp", "sdtp",
                                        # "pc" (utils.rules; the last three the MLP's only)

Both take N x C x H x W images (the MLP flattens them itself) and return class logits. Weights are Xavier-uniform.
The rule changes only the backward pass; the same seed gives the same forward weights under every rule, except
that FA and DFA start the output layer at zero (utils.rules.init_rule_).
"""
import math
import numbers

import torch
from torch import nn

from utils.rules import (OutputError, RuleConv2d, RuleLinear, check_rule, init_rule_, make_learner, rule_forward,
                         rule_param_groups, Wiring)


def _xavier_(module):
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _is_whole(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and float(v).is_integer()


def whole_numbers(value, name):
    """An int (one entry) or a sequence of whole numbers -> a list of ints; ValueError naming `name` for anything
    else (2.5 is never truncated to 2)."""
    try:
        values = [value] if _is_whole(value) else list(value)
    except TypeError:
        raise ValueError(f"{name}={value!r}: give a whole number or a sequence of them, e.g. (32, 64)") from None
    bad = [v for v in values if not _is_whole(v)]
    if bad:
        raise ValueError(f"{name}={value!r}: {bad[0]!r} is not a whole number; give whole numbers, e.g. (32, 64)")
    return [int(v) for v in values]


def _per_block(value, n_blocks, name):
    """A whole number (same for every block) or one per block -> a list of n_blocks ints."""
    values = whole_numbers(value, name)
    values = values * n_blocks if _is_whole(value) else values
    if len(values) != n_blocks:
        raise ValueError(f"{name} has {len(values)} entries but there are {n_blocks} convolution blocks; "
                         f"give one int for all blocks or one per block")
    return values


def _feedback(layers, rule, n_classes):
    """Values of the fixed feedback matrices of `layers` ((weights, inputs, outputs) each) under `rule`: FA one of
    each weight's shape, DFA one n_classes x inputs per layer after the first (utils.rules)."""
    if rule == "fa":
        return sum(w for w, _, _ in layers[1:])
    return sum(n_classes * a for _, a, _ in layers[1:]) if rule == "dfa" else 0


class MLP(nn.Module):
    """Linear + ReLU layers of `hidden_sizes`, then a linear read-out to `n_classes` logits, learning by `rule`;
    `settings`: the rule's own (utils.rules.rule_settings: DTP's noise, predictive coding's inference_steps...)."""

    def __init__(self, in_features, hidden_sizes=(500,), n_classes=10, rule="backprop", **settings):
        super().__init__()
        sizes = [int(in_features)] + whole_numbers(hidden_sizes, "hidden_sizes")   # 10 is one layer, (10,)
        if min(sizes) < 1 or n_classes < 2:
            raise ValueError(f"MLP sizes must be positive and n_classes >= 2; got in_features={in_features}, "
                             f"hidden_sizes={tuple(sizes[1:])}, n_classes={n_classes}")
        self.rule, self.output_error = check_rule(rule), OutputError()
        kw = dict(rule=rule, n_classes=n_classes, shared=self.output_error)
        layers = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [RuleLinear(a, b, Wiring(sends_back=i > 0, **kw)), nn.ReLU()]
        layers.append(RuleLinear(sizes[-1], n_classes, Wiring(sends_back=len(sizes) > 1, is_output=True, **kw)))
        self.net = nn.Sequential(*layers)
        _xavier_(self)
        init_rule_(self)
        # a network rule's learner (DTP's inverses) or None, drawn after the forward weights: the same for every rule
        self.learner = make_learner(rule, sizes, n_classes, **settings)
        if self.learner is not None:
            _xavier_(self.learner)

    def forward(self, x):
        return rule_forward(self, x)

    def param_groups(self, lr):
        """The optimizer's parameter groups where the rule trains some parameters at its own rate, else None."""
        return rule_param_groups(self, lr)

    @staticmethod
    def footprint(in_features, hidden_sizes=(500,), n_classes=10, rule="backprop"):
        """(parameters, fixed feedback values, activation values per example of a training step) of
        MLP(in_features, hidden_sizes, n_classes, rule), counted without building it. The activations: those kept
        for the backward pass and two gradients of the widest layer's size in flight."""
        sizes = [int(in_features)] + whole_numbers(hidden_sizes, "hidden_sizes") + [int(n_classes)]
        layers = [(a * b + b, a, b) for a, b in zip(sizes[:-1], sizes[1:])]   # (weights, inputs, outputs)
        kept = sizes[0] + sum(2 * b for b in sizes[1:-1]) + sizes[-1]          # input, linear and ReLU outputs, logits
        kept += 2 * max(sizes[1:])
        return sum(w for w, _, _ in layers), _feedback(layers, rule, n_classes), kept


def cnn_feature_shape(in_shape, channels, kernel_sizes, stride=1, padding=1):
    """(C, H, W) after each block Conv2d(k, stride, padding) -> MaxPool2d(2); ValueError at the first invalid block.

    A block is invalid when its convolution or pooling output is empty, or when (H + 2 padding - k) is not a whole
    multiple of the stride (the convolution would silently drop border pixels).
    """
    c, h, w = (int(v) for v in in_shape)
    channels = whole_numbers(channels, "channels")
    n = len(channels)
    if n == 0:
        raise ValueError("the CNN needs at least one convolution block (channels is empty)")
    ks, ss, ps = (_per_block(v, n, nm) for v, nm in ((kernel_sizes, "kernel_sizes"), (stride, "stride"),
                                                     (padding, "padding")))
    shapes = []
    for i, (ch, k, s, p) in enumerate(zip(channels, ks, ss, ps), start=1):
        if ch < 1 or k < 1 or s < 1 or p < 0:
            raise ValueError(f"block {i}: channels={ch}, kernel={k}, stride={s}, padding={p}; channels, kernel "
                             f"and stride must be >= 1 and padding >= 0")
        sizes = []
        for dim in (h, w):
            span = dim + 2 * p - k
            if span < 0:
                raise ValueError(f"block {i}: kernel {k} is larger than the padded input {dim}+2*{p}; the "
                                 f"output would be empty - use a smaller kernel or fewer blocks")
            if span % s:
                raise ValueError(f"block {i}: (input {dim} + 2*padding {p} - kernel {k}) = {span} is not a "
                                 f"multiple of stride {s}; the output size would not be a whole number")
            out = span // s + 1
            if out // 2 < 1:
                raise ValueError(f"block {i}: convolution output {out}x{out} is too small for MaxPool2d(2); "
                                 f"the output would be empty - use fewer blocks, a smaller kernel or stride")
            sizes.append(out // 2)
        c, (h, w) = int(ch), sizes
        shapes.append((c, h, w))
    return shapes


class CNN(nn.Module):
    """Blocks of Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d(2), then one linear layer to `n_classes` logits,
    learning by `rule` (DFA sends the output error to each block's output)."""

    def __init__(self, in_shape, channels=(32, 64), kernel_sizes=(3, 3), stride=1, padding=1, n_classes=10,
                 rule="backprop"):
        super().__init__()
        shapes = cnn_feature_shape(in_shape, channels, kernel_sizes, stride, padding)
        n = len(shapes)
        ks, ss, ps = (_per_block(v, n, nm) for v, nm in ((kernel_sizes, "kernel_sizes"), (stride, "stride"),
                                                         (padding, "padding")))
        self.rule, self.output_error = check_rule(rule, "cnn"), OutputError()
        kw = dict(rule=rule, n_classes=n_classes, shared=self.output_error)
        blocks, block_in = [], tuple(int(v) for v in in_shape)
        for i, (shape, k, s, p) in enumerate(zip(shapes, ks, ss, ps)):
            c = shape[0]
            blocks += [RuleConv2d(block_in[0], c, k, s, p, Wiring(sends_back=i > 0, **kw), in_shape=block_in),
                       nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            block_in = shape
        self.features = nn.Sequential(*blocks)
        self.classifier = RuleLinear(math.prod(shapes[-1]), n_classes, Wiring(is_output=True, **kw))
        _xavier_(self)
        init_rule_(self)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

    @staticmethod
    def footprint(in_shape, channels=(32, 64), kernel_sizes=(3, 3), stride=1, padding=1, n_classes=10,
                  rule="backprop"):
        """(parameters, fixed feedback values, activation values per example of a training step) of
        CNN(in_shape, channels, ...), counted without building it. The activations: those kept for the backward
        pass and two gradients of the widest layer's size in flight."""
        shapes = cnn_feature_shape(in_shape, channels, kernel_sizes, stride, padding)
        ks, ss, ps = (_per_block(v, len(shapes), nm) for v, nm in ((kernel_sizes, "kernel_sizes"), (stride, "stride"),
                                                                   (padding, "padding")))
        block_in, layers, kept = tuple(int(v) for v in in_shape), [], math.prod(in_shape)
        for (c, h, w), k, s, p in zip(shapes, ks, ss, ps):
            conv = c * math.prod((d + 2 * p - k) // s + 1 for d in block_in[1:])
            layers.append((block_in[0] * c * k * k + 3 * c, math.prod(block_in), conv))   # conv and batch norm
            kept += 3 * conv + 3 * c * h * w      # conv, batch norm and ReLU outputs; pooled output and its indices
            block_in = (c, h, w)
        layers.append((math.prod(block_in) * n_classes + n_classes, math.prod(block_in), n_classes))
        kept += n_classes + 2 * max(b for _, _, b in layers)
        return sum(w for w, _, _ in layers), _feedback(layers, rule, n_classes), kept

"""Difference target propagation (utils.target_prop, rules "dtp" and "sdtp"): zero error gives zero update, the
inverses learn to reconstruct, no gradient crosses a layer, DTP's first target is a gradient step."""
import pytest
import torch
import torch.nn.functional as F

from utils.classifiers import make_classifier
from utils.models import MLP
from utils.rules import hidden_angles, rule_layers

N_CLASSES = 4


def data(n=32, features=36, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


def mlp(rule, hidden=(7, 6, 5), seed=0, **settings):
    torch.manual_seed(seed)
    return MLP(36, hidden, N_CLASSES, rule=rule, **settings)


def forward(net, X, grad=False):
    """(Ws, bs, activities h_0..h_k, logits), through autograd when `grad`."""
    layers = rule_layers(net)
    Ws, bs = [layer.weight for layer in layers], [layer.bias for layer in layers]
    if not grad:
        Ws, bs = [W.detach() for W in Ws], [b.detach() for b in bs]
    hs = [X]
    for W, b in zip(Ws[:-1], bs[:-1]):
        hs.append(torch.relu(F.linear(hs[-1], W, b)))
    return Ws, bs, hs, F.linear(hs[-1], Ws[-1], bs[-1])


@pytest.mark.parametrize("rule", ["dtp", "sdtp"])
def test_zero_output_error_gives_targets_equal_to_activities_and_no_update(rule):
    X, _ = data()
    net = mlp(rule)
    Ws, bs, hs, z = forward(net, X)
    targets = net.learner.targets(Ws, hs, z, torch.zeros_like(z))
    assert len(targets) == 3 and all(torch.equal(t, h) for t, h in zip(targets, hs[1:]))
    weights = [p for layer in rule_layers(net) for p in (layer.weight, layer.bias)]
    grads = torch.autograd.grad((net(X) * 0).sum(), weights)   # dL/dz = 0: the output target is the output
    assert all(not g.any() for g in grads)
    e = torch.randn_like(z)   # a nonzero error moves every target
    assert all(not torch.equal(t, h) for t, h in zip(net.learner.targets(Ws, hs, z, e), hs[1:]))


@pytest.mark.parametrize("rule", ["dtp", "sdtp"])
def test_no_gradient_crosses_a_layer(rule):
    """Each layer's local loss and each inverse's reconstruction loss reach only their own parameters: hooks on
    every activity of a forward pass through autograd never fire, and a loss's gradient w.r.t. any other
    parameter is absent."""
    X, y = data()
    net = mlp(rule)
    Ws, bs, hs, z = forward(net, X, grad=True)
    fired = []
    for i, h in enumerate(hs[1:], 1):
        h.register_hook(lambda g, i=i: fired.append(i))
    z.register_hook(lambda g: fired.append("z"))
    learner = net.learner
    error = (torch.softmax(z, 1) - F.one_hot(y, N_CLASSES)).detach() / len(y)
    targets = learner.targets(Ws, [h.detach() for h in hs], z.detach(), error * len(y))
    layer_losses = learner.layer_losses(Ws, bs, hs, targets, error)
    inverse_losses = learner.inverse_losses(Ws, bs, hs)
    params = [p for pair in zip(Ws, bs) for p in pair] + list(learner.parameters())
    own_inverse = {id(p): i for i, inv in enumerate(learner.inverses) for p in inv.parameters()}
    for l, loss in enumerate(layer_losses):
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        reached = [i for i, g in enumerate(grads) if g is not None]
        assert reached == [2 * l, 2 * l + 1], (l, reached)
    for j, loss in enumerate(inverse_losses):
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        reached = {own_inverse.get(id(p), "forward") for p, g in zip(params, grads) if g is not None}
        assert reached == {j}
    sum(layer_losses + inverse_losses).backward()
    assert fired == []
    assert len(inverse_losses) == (2 if rule == "dtp" else 3)   # g_2, g_3 (and SDTP's g_L from the output)


def test_dtp_first_target_is_a_gradient_step_so_its_last_hidden_update_is_backprops():
    """DTP's h^_k = h_k - eta dL/dh_k: the last hidden layer's update is eta x backprop's gradient (0 degrees); SDTP
    computes that target by the difference correction, off backprop's direction."""
    X, y = data()
    loss = torch.nn.CrossEntropyLoss()
    dtp = hidden_angles(mlp("dtp"), X, y, loss)
    sdtp = hidden_angles(mlp("sdtp"), X, y, loss)
    assert dtp["hidden3"] < 1e-3 and sdtp["hidden3"] > 1
    nets = {"dtp": mlp("dtp", target_step=0.25), "backprop": mlp("backprop")}
    got, ref = (torch.autograd.grad(F.cross_entropy(net(X), y), rule_layers(net)[2].weight)[0] for net in nets.values())
    assert torch.allclose(got, 0.25 * ref, atol=1e-7) and ref.abs().max() > 1e-3


@pytest.mark.parametrize("rule", ["dtp", "sdtp"])
def test_inverses_learn_to_reconstruct(rule):
    """After training, g_l(f_l(h)) approximates h: each inverse's relative reconstruction error
    ||g_l(f_l(h_(l-1))) - h_(l-1)||^2 / ||h_(l-1)||^2 on the training data falls well below its initial value."""
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(N_CLASSES, 36, generator=g)
    y = torch.arange(400) % N_CLASSES
    X = means[y] + torch.randn(400, 36, generator=g)

    def reconstruction(net):
        Ws, bs, hs, z = forward(net, X)
        ups = [torch.relu(F.linear(h, W, b)) for h, W, b in zip(hs[1:], Ws[1:-1], bs[1:-1])] + [torch.softmax(z, 1)]
        with torch.no_grad():
            return [float((inv(up) - h).square().sum() / h.square().sum())
                    for inv, up, h in zip(net.learner.inverses, ups, hs[1:])]

    clf = make_classifier(f"mlp-{rule}", hidden_sizes=(16, 12, 8), max_epochs=1, lr=3e-3, inverse_lr=1e-2,
                          batch_size=20, seed=0)
    clf.set_params(module__in_features=36, module__n_classes=N_CLASSES).initialize()   # fit's initial network
    before = reconstruction(clf.module_)
    clf.set_params(max_epochs=4).fit(X, y)
    after = reconstruction(clf.module_)
    assert len(before) == (2 if rule == "dtp" else 3) and min(before) > 1
    assert all(a < 0.8 * b for a, b in zip(after, before)) and min(after) < 0.1, (before, after)
    assert clf.score(X, y) > 0.7


def test_inverses_train_at_their_own_rate():
    clf = make_classifier("mlp-dtp", hidden_sizes=(7, 6, 5), inverse_lr=2e-4, lr=1e-3, max_epochs=1)
    X, y = data()
    clf.fit(X, y)
    groups = clf.optimizer_.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 2e-4]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in clf.module_.learner.parameters()}
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['inference_steps'\] for 'mlp'"):
        make_classifier("mlp-dtp", inference_steps=3)


def test_the_angle_diagnostic_leaves_the_random_generator_alone():
    """DTP draws its corruption from torch's generator; the logger's angle (hidden_angles) runs DTP's backward pass
    but restores the generator, so a logged run trains as an unlogged one."""
    X, y = data()
    net = mlp("dtp")
    state = torch.get_rng_state()
    angles = hidden_angles(net, X, y, torch.nn.CrossEntropyLoss())
    assert torch.equal(state, torch.get_rng_state()) and len(angles) == 3

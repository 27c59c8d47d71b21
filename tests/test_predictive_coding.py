"""Predictive coding (utils.predictive_coding, rule "pc"): the prediction-fixed simplification is backprop, the
inference lowers the energy, the full rule stays close to backprop on a trained network."""
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


def mlp(rule="pc", hidden=(7, 5), seed=0, **settings):
    torch.manual_seed(seed)
    return MLP(36, hidden, N_CLASSES, rule=rule, **settings)


def all_grads(net, X, y):
    params = [p for layer in rule_layers(net) for p in (layer.weight, layer.bias)]
    return torch.autograd.grad(F.cross_entropy(net(X), y), params)


def state(net, X, y):
    """(Ws, bs, x, pre-activations, target) of the forward pass, as the learner sees them."""
    layers = rule_layers(net)
    Ws, bs = [layer.weight.detach() for layer in layers], [layer.bias.detach() for layer in layers]
    pre, h = [], X
    for W, b in zip(Ws, bs):
        pre.append(F.linear(h, W, b))
        h = torch.relu(pre[-1])
    return Ws, bs, X, pre, F.one_hot(y, N_CLASSES).float()


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("rate, steps, beta", [(0.1, 300, 1.0), (1.0, 2, 1.0), (0.2, 150, 0.3)])
def test_fixed_prediction_gives_exactly_backprops_weight_updates(rate, steps, beta):
    """Predictions held at the forward pass: after enough inference steps (rate 1: one per hidden layer) every
    weight's and bias's update is backprop's gradient (cosine 1 to 1e-6, same size) against autograd, whatever the
    output term's weight."""
    X, y = data()
    pc = mlp(fixed_prediction=True, inference_rate=rate, inference_steps=steps, output_weight=beta)
    bp = mlp("backprop")
    assert all(torch.equal(a, b) for a, b in zip(pc.state_dict().values(), bp.state_dict().values()))
    for g, ref in zip(all_grads(pc, X, y), all_grads(bp, X, y)):
        assert cosine(g, ref) > 1 - 1e-6
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-7)


def test_without_inference_only_the_output_layer_learns_and_as_backprop():
    """T = 0: the value nodes stay at the forward pass, every hidden error is 0 (no hidden update) and the output
    layer's update is backprop's."""
    X, y = data()
    got, ref = all_grads(mlp(inference_steps=0), X, y), all_grads(mlp("backprop"), X, y)
    assert all(not g.any() for g in got[:-2])
    assert torch.allclose(got[-2], ref[-2], atol=1e-7) and torch.allclose(got[-1], ref[-1], atol=1e-7)


@pytest.mark.parametrize("energy_output", ["cross_entropy", "squared"])
def test_inference_is_gradient_descent_on_the_energy_and_the_energy_falls_monotonically(energy_output):
    X, y = data()
    net = mlp(inference_steps=60, inference_rate=0.05, energy_output=energy_output)
    with torch.no_grad():   # a trained-looking scale: larger weights, so that inference has work to do
        for layer in rule_layers(net):
            layer.weight.mul_(2.0)
    Ws, bs, x, pre, t = state(net, X, y)
    learner = net.learner
    v = [a.clone().requires_grad_() for a in pre[:-1]]
    eps, eps_out, _, _ = learner.errors(Ws, bs, x, v, t)
    stepped = learner.step(Ws, v, eps, eps_out, [(a > 0).float() for a in v])
    dE = torch.autograd.grad(learner.energy(Ws, bs, x, v, t), v)
    for a, s, d in zip(v, stepped, dE):   # v <- v - gamma dE/dv
        assert torch.allclose(s, a - 0.05 * d, atol=1e-5)
    energies = []
    learner.relax(Ws, bs, x, pre, t, energies=energies)
    assert len(energies) == 61 and energies[-1] < 0.9 * energies[0]
    assert all(b <= a + 1e-6 * abs(a) for a, b in zip(energies, energies[1:])), energies
    steep = mlp(inference_steps=30, inference_rate=1.9, energy_output=energy_output).learner   # Euler would diverge
    plain = [v := [a.clone() for a in pre[:-1]]]
    for _ in range(3):
        eps, eps_out, _, _ = steep.errors(Ws, bs, x, v, t)
        plain.append(v := steep.step(Ws, v, eps, eps_out, [(a > 0).float() for a in v]))
    assert steep.energy(Ws, bs, x, plain[-1], t) > steep.energy(Ws, bs, x, plain[0], t)
    energies = []
    steep.relax(Ws, bs, x, pre, t, energies=energies)   # backtracking: each example's rate halves where E would rise
    assert energies[-1] < energies[0] and all(b <= a + 1e-6 * abs(a) for a, b in zip(energies, energies[1:]))


def test_full_predictive_coding_is_within_30_degrees_of_backprop_on_a_trained_network():
    """Without the simplification (predictions follow the value nodes), on a small network trained to a low loss,
    every hidden layer's update is within 30 degrees of backprop's gradient."""
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(N_CLASSES, 36, generator=g)
    y = torch.arange(400) % N_CLASSES
    X = means[y] + torch.randn(400, 36, generator=g)
    clf = make_classifier("mlp-pc", hidden_sizes=(32, 16), max_epochs=3, lr=3e-3, batch_size=20, seed=0)
    clf.fit(X[:300], y[:300])
    assert clf.score(X[300:], y[300:]) > 0.9
    angles = hidden_angles(clf.module_, X[:64], y[:64], torch.nn.CrossEntropyLoss())
    assert set(angles) == {"hidden1", "hidden2"} and all(0 <= a < 30 for a in angles.values()), angles


def test_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="energy_output='l1'; valid: cross_entropy, squared"):
        mlp(energy_output="l1")
    with pytest.raises(ValueError, match="inference_steps=-1 must be >= 0"):
        mlp(inference_steps=-1)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['noise'\] for learning rule 'pc'"):
        mlp(noise=0.1)


def test_a_light_output_term_brings_the_updates_to_backprops():
    """W&B 2017: with a small weight of the output term (a large output variance) the errors stay small and the
    relaxed updates approach backprop's: the angle to backprop falls with beta, on an untrained network too (not to 0
    at a finite beta: the ReLU derivatives of units near 0 still flip as their nodes move)."""
    X, y = data(n=64)
    loss = torch.nn.CrossEntropyLoss()
    got = [max(hidden_angles(mlp(inference_steps=40, output_weight=b), X, y, loss).values()) for b in (1.0, 0.1, 0.01)]
    assert got[0] > 1.5 * got[1] > 1.5 * got[2] and got[2] < 5, got

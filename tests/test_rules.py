"""The learning rules of utils.rules on small networks: forward pass, backward signals by hand, feedback matrices,
checkpoints, the angle diagnostic and learning."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.logger import TrainingLogger
from utils.runs import angles
from utils.models import CNN, MLP
from utils.rules import (RULES, ZERO_OUTPUT_RULES, RuleConv2d, RuleLinear, angle_degrees, hidden_angles, rule_layers,
                         rule_settings, rules_for, Wiring)
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.classifiers import make_classifier

N_CLASSES = 4


def data(n=32, shape=(1, 6, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


def mlp(rule, hidden=(7, 5), seed=0):
    torch.manual_seed(seed)
    return MLP(36, hidden, N_CLASSES, rule=rule)


def cnn(rule, seed=0):
    torch.manual_seed(seed)
    return CNN((1, 6, 6), channels=(3, 4), kernel_sizes=(3, 3), padding=1, n_classes=N_CLASSES, rule=rule)


def grads(net, X, y):
    loss = F.cross_entropy(net(X), y)
    return torch.autograd.grad(loss, [layer.weight for layer in rule_layers(net)])


def mlp_by_hand(net, X, y, feedback_of):
    """The MLP's weight gradients computed by hand: delta_L = e, delta_l = (feedback_of(l, e, delta_(l+1))) * relu'.

    feedback_of(l, e, delta) gives the signal sent back to hidden layer l from the layer above."""
    layers = rule_layers(net)
    hs, pre = [X.flatten(1)], []
    for layer in layers[:-1]:
        pre.append(hs[-1] @ layer.weight.T + layer.bias)
        hs.append(torch.relu(pre[-1]))
    logits = hs[-1] @ layers[-1].weight.T + layers[-1].bias
    e = (torch.softmax(logits, 1) - F.one_hot(y, N_CLASSES)) / len(y)
    delta, out = e, [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        out[i] = delta.T @ hs[i]
        if i:
            delta = feedback_of(i, e, delta) * (pre[i - 1] > 0)
    return out


@pytest.mark.parametrize("make", [mlp, cnn])
def test_forward_equals_backprop_and_last_layer_update_too(make):
    X, y = data()
    for rule in rules_for(make.__name__):
        net = make(rule)
        ref = make("backprop")
        ref.load_state_dict(net.state_dict(), strict=False)   # the same weights (FA / DFA: their zero output layer)
        ref_grads = grads(ref, X, y)
        assert torch.allclose(net(X), ref(X), atol=1e-6)
        if rule != "pc":   # predictive coding's output layer learns at the relaxed nodes (tests/test_predictive_coding)
            assert torch.allclose(grads(net, X, y)[-1], ref_grads[-1], atol=1e-6), rule


@pytest.mark.parametrize("make", [mlp, cnn])
def test_same_seed_same_forward_weights_but_fa_and_dfa_start_the_output_layer_at_zero(make):
    ref = rule_layers(make("backprop"))
    for rule in rules_for(make.__name__):
        layers = rule_layers(make(rule))
        for a, b in zip(layers[:-1], ref[:-1]):   # every hidden layer: the seed's Xavier draw under every rule
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        if rule in ZERO_OUTPUT_RULES:
            assert not layers[-1].weight.any() and not layers[-1].bias.any()
        else:
            assert torch.equal(layers[-1].weight, ref[-1].weight) and layers[-1].weight.abs().sum() > 0
        fb = [layer.feedback for layer in layers if layer.feedback is not None]
        assert all(f.abs().sum() > 0 for f in fb) and (len(fb) > 0) == (rule in ("fa", "dfa"))
    assert set(ZERO_OUTPUT_RULES) == {"fa", "dfa"}


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_feedback_scale_bounds_and_adam_does_not_see_it(rule):
    """B ~ U(-a, a), a the Xavier bound of the layer (FA: W's fans; DFA: n_classes and the hidden layer's units), and
    Adam's trajectory is the same when every B is multiplied by 10 (its per-parameter normalisation removes the
    scale), so the feedback scale is not a knob under Adam."""
    layers = rule_layers(mlp(rule, hidden=(60, 50)))
    for layer in layers[1:]:
        fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
        if rule == "dfa":
            fan_in, fan_out = layer.feedback.shape
        a = math.sqrt(6 / (fan_in + fan_out))
        assert layer.feedback.abs().max() <= a and layer.feedback.abs().max() > 0.8 * a
        assert layer.feedback.std() == pytest.approx(a / math.sqrt(3), rel=0.15)
    X, y = data(n=64)
    nets = [mlp(rule, hidden=(60, 50)) for _ in range(2)]
    with torch.no_grad():
        for layer in rule_layers(nets[1]):
            if layer.feedback is not None:
                layer.feedback.mul_(10.0)
    for net in nets:
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for i in range(0, 64, 16):
            opt.zero_grad()
            F.cross_entropy(net(X[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
    for a, b in zip(rule_layers(nets[0]), rule_layers(nets[1])):
        assert torch.allclose(a.weight, b.weight, atol=1e-4)   # steps of 1e-2 each; the rest is Adam's epsilon
    assert not torch.equal(rule_layers(nets[0])[0].weight, rule_layers(mlp(rule, hidden=(60, 50)))[0].weight)


def test_fa_and_dfa_align_faster_from_the_zero_output_layer():
    """From the zero output layer FA's and DFA's last hidden update comes within 90 degrees of backprop's gradient
    within a few dozen Adam steps, well ahead of the same network started from a random (Xavier) output layer."""
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(N_CLASSES, 1, 6, 6, generator=g)
    y = torch.arange(320) % N_CLASSES
    X = means[y] + torch.randn(320, 1, 6, 6, generator=g)
    for rule in ("fa", "dfa"):
        got = {}
        for start in ("zero", "xavier"):
            net = mlp(rule, hidden=(40, 30))
            if start == "xavier":
                torch.manual_seed(1)
                torch.nn.init.xavier_uniform_(rule_layers(net)[-1].weight)
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            for _ in range(2):
                for i in range(0, 320, 16):
                    opt.zero_grad()
                    F.cross_entropy(net(X[i:i + 16]), y[i:i + 16]).backward()
                    opt.step()
            got[start] = hidden_angles(net, X, y, torch.nn.CrossEntropyLoss())["hidden2"]
        assert got["zero"] < 75 and got["zero"] < got["xavier"] - 10, (rule, got)


def test_backprop_by_hand_matches_autograd():
    """The hand computation the other tests use, checked against backprop itself."""
    X, y = data()
    net = mlp("backprop")
    layers = rule_layers(net)
    by_hand = mlp_by_hand(net, X, y, lambda i, e, d: d @ layers[i].weight)
    for g, h in zip(grads(net, X, y), by_hand):
        assert torch.allclose(g, h, atol=1e-6)


def test_fa_hidden_update_is_b_transpose_delta():
    X, y = data()
    net = mlp("fa")
    layers = rule_layers(net)
    assert layers[0].feedback is None and all(layer.feedback.shape == layer.weight.shape for layer in layers[1:])
    by_hand = mlp_by_hand(net, X, y, lambda i, e, d: d @ layers[i].feedback)
    bp = grads(mlp("backprop"), X, y)
    for g, h, b in zip(grads(net, X, y), by_hand, bp):
        assert torch.allclose(g, h, atol=1e-6)
    assert not torch.allclose(grads(net, X, y)[0], bp[0], atol=1e-3)   # the hidden update is not backprop's


def test_dfa_hidden_update_is_output_error_through_its_fixed_matrix():
    X, y = data()
    net = mlp("dfa")
    layers = rule_layers(net)
    # one matrix per hidden layer l, held by the layer after it: (n_classes, units of l)
    assert layers[0].feedback is None
    assert [tuple(layer.feedback.shape) for layer in layers[1:]] == [(N_CLASSES, 7), (N_CLASSES, 5)]
    by_hand = mlp_by_hand(net, X, y, lambda i, e, d: e @ layers[i].feedback)   # e, not the delta above
    for g, h in zip(grads(net, X, y), by_hand):
        assert torch.allclose(g, h, atol=1e-6)


def test_sign_symmetry_feedback_has_the_forward_signs_and_fixed_magnitude():
    torch.manual_seed(0)
    layer = RuleLinear(6, 3, Wiring("sign"))
    x = torch.zeros(3, 6, requires_grad=True)
    (fb,) = torch.autograd.grad(layer(x), x, grad_outputs=torch.eye(3))   # row k: what output k sends back
    assert torch.equal(torch.sign(fb), torch.sign(layer.weight))
    assert torch.allclose(fb.abs(), torch.full_like(fb, math.sqrt(2 / 9)))
    assert layer.feedback is None   # nothing stored: the signs are read from W
    X, y = data()
    net = mlp("sign")
    layers = rule_layers(net)
    by_hand = mlp_by_hand(net, X, y, lambda i, e, d: d @ (torch.sign(layers[i].weight) * layers[i].scale))
    for g, h in zip(grads(net, X, y), by_hand):
        assert torch.allclose(g, h, atol=1e-6)


@pytest.mark.parametrize("rule", ["fa", "sign"])
def test_convolution_sends_back_through_its_feedback_kernel(rule):
    torch.manual_seed(0)
    conv = RuleConv2d(2, 3, 3, padding=1, wiring=Wiring(rule))
    conv.reset_feedback_()   # a lone layer's feedback buffer is torch.empty until drawn (NaN at times)
    ref = torch.nn.Conv2d(2, 3, 3, padding=1)
    ref.load_state_dict({"weight": conv.weight.detach(), "bias": conv.bias.detach()})
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    g_out = torch.randn(2, 3, 5, 5)
    gx, gw, gb = torch.autograd.grad(conv(x), [x, conv.weight, conv.bias], g_out)
    rx, rw, rb = torch.autograd.grad(ref(x), [x, ref.weight, ref.bias], g_out)
    kernel = conv.feedback if rule == "fa" else torch.sign(conv.weight) * conv.scale
    assert torch.allclose(gx, F.conv_transpose2d(g_out, kernel, padding=1), atol=1e-5)
    assert torch.allclose(gw, rw, atol=1e-5) and torch.allclose(gb, rb, atol=1e-5)   # its own update: backprop's


def test_cnn_dfa_sends_the_output_error_to_each_block():
    X, y = data()
    net = cnn("dfa")
    conv2, out = rule_layers(net)[1], rule_layers(net)[-1]
    assert tuple(conv2.feedback.shape) == (N_CLASSES, 3 * 3 * 3) and tuple(out.feedback.shape) == (N_CLASSES, 4)
    block1 = net.features[:4](X)
    block1.retain_grad()
    h = net.features[4:](block1)
    logits = net.classifier(h.flatten(1))
    logits.retain_grad()
    F.cross_entropy(logits, y).backward()
    assert torch.allclose(block1.grad, (logits.grad @ conv2.feedback).view_as(block1), atol=1e-6)


def test_feedback_is_drawn_from_the_seed_fixed_by_training_and_kept_by_checkpoints(tmp_path):
    assert torch.equal(rule_layers(mlp("fa", seed=3))[1].feedback, rule_layers(mlp("fa", seed=3))[1].feedback)
    assert not torch.equal(rule_layers(mlp("fa", seed=3))[1].feedback, rule_layers(mlp("fa", seed=4))[1].feedback)
    X, y = data(n=64)
    for rule in ("fa", "dfa"):
        clf = make_classifier("mlp", rule=rule, hidden_sizes=(7, 5), max_epochs=2, batch_size=16, seed=5)
        clf.fit(X, y)
        before = {k: v.clone() for k, v in clf.module_.state_dict().items() if k.endswith("feedback")}
        w0 = rule_layers(clf.module_)[0].weight.detach().clone()
        clf.partial_fit(X, y)
        assert not torch.equal(w0, rule_layers(clf.module_)[0].weight)   # the weights learn ...
        state = clf.module_.state_dict()
        assert len(before) == 2 and all(torch.equal(state[k], v) for k, v in before.items())   # ... B does not
        fresh = make_classifier("mlp", rule=rule, hidden_sizes=(7, 5), max_epochs=1, seed=5)
        fresh.fit(X[:16], y[:16])
        assert all(torch.equal(fresh.module_.state_dict()[k], v) for k, v in before.items())   # same seed, same B
        save_checkpoint(clf, f"rule_{rule}", directory=tmp_path)
        loaded = load_checkpoint(f"rule_{rule}", directory=tmp_path, device="cpu")
        assert all(torch.equal(loaded.module_.state_dict()[k], v) for k, v in before.items())
        assert (loaded.predict_proba(X) == clf.predict_proba(X)).all()
        reloaded = MLP(36, (7, 5), int(y.max()) + 1, rule=rule)   # make_classifier's n_classes: largest label + 1
        reloaded.load_state_dict(state)
        assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in before.items())


def test_angle_is_zero_for_backprop_and_matches_a_hand_computation_for_fa():
    X, y = data()
    loss = torch.nn.CrossEntropyLoss()
    assert hidden_angles(mlp("backprop"), X, y, loss) == {"hidden1": 0.0, "hidden2": 0.0}
    cnn_bp = cnn("backprop")
    cnn_bp.train()
    running = cnn_bp.features[1].running_mean.clone()
    assert hidden_angles(cnn_bp, X, y, loss) == {"hidden1": 0.0, "hidden2": 0.0}
    assert torch.equal(running, cnn_bp.features[1].running_mean)   # batch-norm statistics restored
    net = mlp("fa")
    layers = rule_layers(net)
    torch.nn.init.xavier_uniform_(layers[-1].weight)   # FA's output layer starts at zero: backprop's gradient would be 0
    fa = mlp_by_hand(net, X, y, lambda i, e, d: d @ layers[i].feedback)
    bp = mlp_by_hand(net, X, y, lambda i, e, d: d @ layers[i].weight)
    got = hidden_angles(net, X, y, loss)
    for i in range(2):
        a, b = fa[i].detach().flatten().double(), bp[i].detach().flatten().double()
        by_hand = math.degrees(math.acos(float(a.detach() @ b.detach() / (a.norm() * b.norm()))))
        assert 1 < by_hand < 179 and got[f"hidden{i + 1}"] == pytest.approx(by_hand, abs=1e-3)
    assert net.net[1].rule == "fa"   # the module's rule is back in place
    assert angle_degrees(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(90.0)


@pytest.mark.filterwarnings("ignore::utils.logger.LoggerOverheadWarning")   # tiny fits: the logger dominates
def test_logger_records_each_rules_angle_in_the_compartmental_format():
    X, y = data(n=96)
    for rule in ("backprop", "fa"):
        log = TrainingLogger(X[:32], y[:32], records_per_epoch=2)
        make_classifier("mlp", rule=rule, hidden_sizes=(7,), max_epochs=1, batch_size=16, logger=log).fit(X, y)
        a = angles(log)
        assert set(a["layer"]) == {"hidden1"} and len(a) == 2 and a["bp_angle"].notna().all()
        if rule == "backprop":
            assert (a["bp_angle"] == 0).all()
        else:
            assert a["bp_angle"].between(1, 179).all()


def test_unknown_rule_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown learning rule 'feedback'.*backprop, fa, dfa, sign"):
        MLP(36, (5,), N_CLASSES, rule="feedback")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_every_rule_learns_a_separable_problem(kind):
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(N_CLASSES, 1, 6, 6, generator=g)
    y = torch.arange(400) % N_CLASSES
    X = means[y] + torch.randn(400, 1, 6, 6, generator=g)
    hp = dict(hidden_sizes=(32,)) if kind == "mlp" else dict(channels=(8,), kernel_sizes=3)
    for rule in rules_for(kind):
        clf = make_classifier(kind, rule=rule, max_epochs=4, lr=3e-3, batch_size=20, seed=0, **hp)
        clf.fit(X[:300], y[:300])
        assert clf.score(X[300:], y[300:]) > 0.8, rule   # chance: 0.25


@pytest.mark.filterwarnings("ignore::utils.logger.LoggerOverheadWarning")
def test_workspace_trains_and_studies_every_rule_and_draws_their_angles(mnist_root, tmp_path):
    from utils import plot_study
    from utils.runs import concat_runs
    from utils.data import load_dataset
    from utils.workspace import rule_study, settings, train_rules
    S = dict(settings(True), n_train=200, n_valid=100, epochs=1, max_valid=50, bo_iterations=2, bo_folds=2,
             bo_subset=100, bo_init_points=1, bo_retrain_subset=100, bo_test_subset=100, bo_out=str(tmp_path / "bo"))
    ds = load_dataset("mnist", root=mnist_root, device="cpu")
    logs, models = train_rules(ds, S, device="cpu", out=tmp_path / "runs")
    assert list(logs) == [f"mlp-{rule}" for rule in RULES]
    table = concat_runs([tmp_path / "runs" / f"mnist_{k}" for k in logs])
    a = angles(table)
    assert set(a["model"]) == set(logs) and (a[a["model"] == "mlp-backprop"]["bp_angle"] == 0).all()
    assert a[a["model"] == "mlp-fa"]["bp_angle"].between(1, 179).all()
    fig = plot_study.plot_rule_angles(table, path=tmp_path / "angles.png")
    assert (tmp_path / "angles.png").stat().st_size > 0
    assert len(fig.axes[0].get_lines()) == len(RULES) + 1   # every rule x one hidden layer, and the 90 degree line
    summary = rule_study([ds], S, device="cpu", verbose=0)
    assert list(summary["model"]) == [f"mlp-{rule}" for rule in RULES[1:]] and (summary["n_evals"] == 2).all()


NETWORK_RULE_SETTINGS = {"mlp-dtp": dict(noise=0.2, inverse_lr=2e-3, target_step=0.3),
                         "mlp-sdtp": dict(noise=0.05, inverse_lr=5e-4),
                         "mlp-pc": dict(inference_steps=7, inference_rate=0.15)}


@pytest.mark.parametrize("model", sorted(NETWORK_RULE_SETTINGS))
def test_network_rule_kind_checkpoint_round_trip(model, tmp_path):
    """A DTP / SDTP / PC estimator comes back from its checkpoint with its rule, settings, inverses, optimizer
    groups (the inverses' own rate) and predictions, and continues training exactly as the original."""
    X, y = data(n=64)
    settings = NETWORK_RULE_SETTINGS[model]
    clf = make_classifier(model, hidden_sizes=(7, 5), max_epochs=2, batch_size=16, seed=3, **settings).fit(X, y)
    save_checkpoint(clf, "net", directory=tmp_path)
    loaded = load_checkpoint("net", directory=tmp_path, device="cpu")
    assert loaded.module_.rule == model.split("-")[1] and loaded.module_.learner.cfg == clf.module_.learner.cfg
    assert all(getattr(loaded.module_.learner.cfg, k) == v for k, v in settings.items())
    assert [g["lr"] for g in loaded.optimizer_.param_groups] == [g["lr"] for g in clf.optimizer_.param_groups]
    assert (loaded.predict_proba(X) == clf.predict_proba(X)).all()
    for est in (clf, loaded):
        torch.manual_seed(11)   # DTP's corruption: torch's global generator, which a checkpoint does not carry
        est.partial_fit(X, y)
    for (k, a), b in zip(clf.module_.state_dict().items(), loaded.module_.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("model", sorted(NETWORK_RULE_SETTINGS))
def test_network_rule_kind_goes_through_the_study(model, tmp_path):
    """The study searches the MLP's space plus the rule's own numbers, starts from the rule's defaults and trains
    each proposal under the rule."""
    from utils.classifiers import RULE_SPACES
    from utils.spaces import make_space, to_hyperparameters
    from utils.study import run_study
    from utils.study_log import read_log
    from utils.data import Dataset
    g = torch.Generator().manual_seed(0)
    means = torch.rand(N_CLASSES, 1, 6, 6, generator=g)
    y = torch.arange(160) % N_CLASSES
    X = (means[y] + 0.1 * torch.randn(160, 1, 6, 6, generator=g)).clamp(0, 1)
    ds = Dataset(X[:120], y[:120], X[120:], y[120:], [str(c) for c in range(N_CLASSES)])
    rule = model.split("-")[1]
    space = make_space(model)
    assert set(space) == set(make_space("mlp")) | set(RULE_SPACES[rule])
    res = run_study(model, ds, iterations=2, folds=2, epochs=1, out=tmp_path, init_points=1, verbose=0,
                    fixed={"batch_size": 30})
    recs = [r for r in read_log(res["study_dir"] / "evals.jsonl") if "target" in r]
    assert [r["status"] for r in recs] == ["ok", "ok"] and res["test_acc"] is not None
    hp = to_hyperparameters(model, recs[0]["params"])
    assert set(RULE_SPACES[rule]) <= set(recs[0]["params"])
    assert {k: hp[k] for k in rule_settings(rule) if k in hp} == {
        k: pytest.approx(v) for k, v in rule_settings(rule).items() if k in hp}   # evaluation 0: the defaults


@pytest.mark.filterwarnings("ignore::utils.logger.LoggerOverheadWarning")
@pytest.mark.parametrize("model", sorted(NETWORK_RULE_SETTINGS))
def test_logger_records_every_hidden_layers_angle_under_the_network_rules(model):
    X, y = data(n=96)
    log = TrainingLogger(X[:32], y[:32], records_per_epoch=2)
    make_classifier(model, hidden_sizes=(7, 5), max_epochs=1, batch_size=16, logger=log).fit(X, y)
    a = angles(log)
    assert set(a["layer"]) == {"hidden1", "hidden2"} and len(a) == 4 and a["bp_angle"].between(0, 180).all()
    assert a[a["layer"] == "hidden1"]["bp_angle"].min() > 1   # not backprop's update

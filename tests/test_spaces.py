"""utils.spaces: the search spaces (native integer and categorical parameters), the conversion of a point of a
space into make_classifier's arguments, and the check of CNN architectures."""
import numpy as np
import pytest

from utils.propose import make_optimizer
from utils.compartmental_kind import COMPARTMENTAL_FLAGS
from utils.spaces import SPACES, check_hyperparameters, make_space, to_hyperparameters


def test_spaces_use_native_integer_and_categorical_parameters():
    from bayes_opt.parameter import CategoricalParameter, FloatParameter, IntParameter
    for model in SPACES:
        opt = make_optimizer(make_space(model), np.random.RandomState(0))
        cfg = opt.space.params_config
        assert isinstance(cfg["n_layers" if model != "cnn" else "n_blocks"], IntParameter)
        if model != "compartmental":
            assert isinstance(cfg["batch_size"], IntParameter) and isinstance(cfg["log10_lr"], FloatParameter)
            assert 10 ** cfg["log10_lr"].bounds[0] == pytest.approx(1e-4)
            assert 10 ** cfg["log10_lr"].bounds[1] == pytest.approx(5e-2)
    cfg = make_optimizer(make_space("compartmental"), np.random.RandomState(0)).space.params_config
    assert all(isinstance(cfg[f], CategoricalParameter) for f in COMPARTMENTAL_FLAGS)
    assert len(COMPARTMENTAL_FLAGS) == 11
    capped = make_space("compartmental", max_phase=40)
    assert capped["l_f_phase"][1] == 40 and capped["l_t_phase"][1] == 40
    with pytest.raises(ValueError):
        make_space("mlp", max_phase=40)


def test_to_hyperparameters():
    mlp = to_hyperparameters("mlp", {"batch_size": 37, "log10_lr": -2.5, "n_layers": 2, **{
        f"units_{i}": 100 + i for i in range(1, 7)}})
    assert mlp == {"hidden_sizes": (101, 102), "lr": pytest.approx(10 ** -2.5), "batch_size": 37}
    cnn = to_hyperparameters("cnn", {"batch_size": 64, "log10_lr": -3.0, "n_blocks": 3, "stride": 2, "padding": 1,
                                        **{f"channels_{i}": 10 * i for i in range(1, 6)},
                                        **{f"kernel_{i}": i + 1 for i in range(1, 6)}})
    assert cnn["channels"] == (10, 20, 30) and cnn["kernel_sizes"] == (2, 3, 4)
    assert (cnn["stride"], cnn["padding"], cnn["batch_size"]) == (2, 1, 64) and cnn["lr"] == pytest.approx(1e-3)
    # every random compartmental proposal satisfies the estimator's constraints
    opt = make_optimizer(make_space("compartmental"), np.random.RandomState(0))
    for params in opt.random_sample(200):
        hp = to_hyperparameters("compartmental", params)
        n = len(hp["n_hidden"])
        assert 1 <= n <= 6 and all(30 <= u <= 500 for u in hp["n_hidden"])
        assert len(hp["f_etas"]) == n + 1 and len(hp["b_etas"]) == n
        assert hp["tau_L"] > hp["tau_s"] > 0 and hp["dt"] > 0
        assert 1 <= hp["integration_time"] <= min(hp["l_f_phase"], hp["l_t_phase"])
        assert all(isinstance(hp[f], bool) for f in COMPARTMENTAL_FLAGS)
        assert hp["g_L"] == pytest.approx(1 / hp["tau_L"]) and hp["g_D"] == hp["g_B"] and hp["mem"] >= 10
        assert check_hyperparameters("compartmental", hp, (1, 8, 8)) is None  # the estimator's own validation


def test_check_hyperparameters_names_the_invalid_cnn_block():
    good = dict(channels=(8, 8), kernel_sizes=(3, 3), stride=1, padding=1)
    assert check_hyperparameters("cnn", good, (1, 28, 28)) is None
    reason = check_hyperparameters("cnn", dict(good, channels=(8,) * 5, kernel_sizes=(3,) * 5), (1, 28, 28))
    assert reason and "block 5" in reason


def test_held_structure_is_the_papers_and_leaves_the_numbers_searched():
    from utils.compartmental_kind import STRUCTURE
    from utils.spaces import held_params, reference_params
    held = held_params("compartmental", "structure", batch_size=16)
    full = make_space("compartmental")
    assert set(held) == set(STRUCTURE) and held == {k: reference_params("compartmental", full, 16)[k] for k in held}
    assert held["n_layers"] == 1 and held["units_1"] == 500 and held["l_f_phase"] == 50
    space = make_space("compartmental", held=held)
    assert set(space) == set(full) - set(STRUCTURE)
    assert {"lambda_max", "tau_s", "g_B", "log10_f_eta_hidden", "log10_f_eta_out"} <= set(space)
    assert held_params("mlp", ["batch_size"]) == {"batch_size": reference_params("mlp", make_space("mlp"))["batch_size"]}
    with pytest.raises(ValueError, match="compartmental"):
        held_params("mlp", "structure")
    with pytest.raises(ValueError, match="not parameters"):
        held_params("compartmental", ["no_such_parameter"])

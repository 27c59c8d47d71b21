"""utils.workspace: the notebooks' settings. Quick mode is bounded by design; figures of quick runs go elsewhere."""
from pathlib import Path

import pandas as pd
import pytest
import torch

from utils import plotting, results, workspace


@pytest.fixture
def figures_dir(monkeypatch):
    monkeypatch.setattr(plotting, "FIGURES_DIR", plotting.FIGURES_DIR)  # restored after the test
    monkeypatch.delenv("BIODL_FIGURES", raising=False)
    return monkeypatch


def test_quick_figures_never_go_to_the_committed_figures(figures_dir, tmp_path):
    quick, full = workspace.settings(True), workspace.settings(False)
    assert workspace.use_figures_dir(quick) == Path("runs/figures")
    assert plotting.figure_path("mnist_samples.png") == Path("runs/figures/mnist_samples.png")
    assert workspace.use_figures_dir(full) == Path("runs/figures")  # README's figures: python -m utils.results only
    assert workspace.use_figures_dir(quick, tmp_path / "mine") == tmp_path / "mine"  # the notebook's FIGURES
    figures_dir.setenv("BIODL_FIGURES", str(tmp_path / "env"))
    assert workspace.use_figures_dir(quick) == tmp_path / "env"


def test_quick_tiny_and_full_settings_have_the_same_keys():
    assert set(workspace.QUICK) == set(workspace.FULL) == set(workspace.TINY)
    assert workspace.settings(True) is not workspace.QUICK  # a copy: a notebook may change its own
    assert workspace.settings("tiny")["quick"] == "tiny" and workspace.settings(False)["quick"] is False


def test_quick_mode_from_the_parameter_or_the_environment(monkeypatch):
    monkeypatch.delenv("WORKSPACE_QUICK", raising=False)
    assert workspace.quick_mode(False) is False and workspace.quick_mode(True) is True
    monkeypatch.setenv("WORKSPACE_QUICK", "1")
    assert workspace.quick_mode(False) is True
    monkeypatch.setenv("WORKSPACE_QUICK", "tiny")
    assert workspace.quick_mode(False) == "tiny" and workspace.quick_mode(True) is True
    monkeypatch.setenv("WORKSPACE_QUICK", "0")
    assert workspace.quick_mode(False) is False
    for spelling in ("true", "TRUE", "yes", " 1", "on", "Quick"):
        monkeypatch.setenv("WORKSPACE_QUICK", spelling)
        assert workspace.quick_mode(False) is True, spelling
    monkeypatch.setenv("WORKSPACE_QUICK", "TINY")
    assert workspace.quick_mode(False) == "tiny"


@pytest.mark.parametrize("value", ["banana", "2", "quick mode", "y"])
def test_an_unknown_quick_mode_is_refused_with_the_valid_values(monkeypatch, value):
    """WORKSPACE_QUICK=banana used to select full mode silently (days of CPU)."""
    monkeypatch.setenv("WORKSPACE_QUICK", value)
    with pytest.raises(ValueError, match=r"WORKSPACE_QUICK=.* is not a mode; valid: .*'1'.*'tiny'"):
        workspace.quick_mode(False)


def test_rerun_trains_all_in_quick_mode_and_only_the_named_steps_otherwise():
    assert workspace.settings(True)["rerun"] == workspace.settings("tiny")["rerun"] == set(workspace.STEPS)
    assert workspace.settings(False)["rerun"] == set()
    assert workspace.settings(False, "all")["rerun"] == set(workspace.STEPS)
    assert workspace.settings(False, ["rules"])["rerun"] == {"rules"}
    assert workspace.settings(False, "study")["rerun"] == {"study"}
    assert workspace.settings(False)["bo_out"].endswith("results/study")   # the committed studies, read only
    assert workspace.settings(False, "study")["bo_out"] == workspace.FULL["bo_out"]
    with pytest.raises(ValueError, match="RERUN='everything': valid are None"):
        workspace.settings(False, "everything")


@pytest.mark.parametrize("mode", [True, "tiny"])
def test_quick_sizes_are_capped(mode):
    """Quick mode stays minutes on a 2-core CPU by design (its learning floors: benchmarks/bench_quick.py)."""
    S = workspace.settings(mode)
    assert S["n_train"] <= 20000 and S["compartmental_n_train"] <= S["n_train"] and S["n_test"] <= 2000
    assert S["mlp_epochs"] <= 4 and S["epochs"] <= 2 and S["compartmental_epochs"] == 1 and S["bo_epochs"] == 1
    assert (S["compartmental_test_steps"] or 250) <= 250 and S["bo_max_phase"] <= 30
    for kind in ("mlp", "cnn", "compartmental"):
        st = workspace._study_settings(kind, S)
        assert st.iterations <= 3 and st.subset <= 4000 and st.retrain_subset <= 4000
        assert st.test_subset <= 200 and st.folds == 2 and st.out == S["bo_out"]
    assert workspace._study_settings("compartmental", S).iterations == 1
    assert S["bo_out"] != workspace.FULL["bo_out"] and S["figures"] == "runs/figures"


def test_full_mode_retrains_the_committed_reference_configurations():
    S = workspace.settings(False, "all")
    assert workspace.model_hyperparameters("cnn", "cifar10", S) == results.PIECES["cifar10/cnn"].hyperparameters
    assert workspace.model_hyperparameters("mlp-fa", "mnist", S)["lr"] == 3e-4
    assert workspace.model_hyperparameters("mlp", "mnist", workspace.settings(True)) == workspace.MODELS["mlp"]


def test_quick_compartmental_study_is_the_papers_network_alone(monkeypatch, mnist_root):
    """Quick mode's compartmental study runs one evaluation: the reference configuration (the paper's network),
    with phases capped and a short test phase; full mode keeps the specified study."""
    from utils.data import load_dataset
    calls = []

    def fake_run_study(kind, dataset, settings):
        calls.append((kind, settings))
        assert settings.name == "mnist" and len(dataset.y_train) == 60000  # loaded once, handed over as a Dataset
        return {"summary": pd.DataFrame([{"model": kind, "dataset": settings.name}])}
    monkeypatch.setattr(workspace, "run_study", fake_run_study)
    data = {"mnist": load_dataset("mnist", root=mnist_root, device="cpu")}
    workspace.study(data, workspace.settings(True))
    quick = dict(calls)
    assert quick["compartmental"].iterations == 1 and quick["compartmental"].start == "reference"
    assert quick["compartmental"].max_phase == 30
    assert quick["compartmental"].fixed == {"batch_size": 16}   # the paper's 250-step test phase
    assert quick["compartmental"].subset == 4000
    assert quick["mlp"].iterations == 3 and quick["mlp"].fixed is None
    calls.clear()
    workspace.study(data, workspace.settings(False, "study"))
    full = dict(calls)
    assert full["compartmental"].iterations == 50 and full["compartmental"].fixed == {"batch_size": 16}
    assert full["compartmental"].max_phase is None and full["compartmental"].subset is None


def test_one_iteration_study_evaluates_only_the_reference(tmp_path):
    """What quick mode relies on: a study of one iteration trains the reference configuration and nothing else."""
    from utils.data import Dataset
    from utils.spaces import make_space, reference_params
    from utils.study import run_study
    g = torch.Generator().manual_seed(0)
    X, y = torch.rand(60, 1, 8, 8, generator=g), torch.arange(60) % 10
    ds = Dataset(X, y, X[:20], y[:20], [str(i) for i in range(10)])
    seen = []

    def evaluate(hp):
        seen.append(hp)
        return [0.5, 0.5]
    settings = workspace._study_settings("compartmental", workspace.settings(True), subset=None, retrain_subset=None,
                                         test_subset=None)
    out = run_study("compartmental", ds, settings, name="toy", out=tmp_path, evaluate=evaluate, retrain=False,
                    verbose=0)
    assert len(seen) == 1 and list(out["evals"]["source"]) == ["start"]
    ref = reference_params("compartmental", make_space("compartmental", 30), 16)
    assert out["evals"]["params"].iloc[0] == ref and seen[0]["n_hidden"] == (500,)


@pytest.mark.filterwarnings("ignore::utils.logger.LoggerOverheadWarning")
def test_a_notebooks_steps_load_each_dataset_once(monkeypatch, mnist_root, tmp_path):
    """The notebook loads each dataset once (one cell) and hands the Dataset to every step: training, test
    accuracies, the rules and both studies load nothing again; the loggers handed back give the table of their
    saved runs without reading them."""
    import utils.data
    import utils.study
    from utils.runs import concat_runs
    loads, studied = [], []
    real_load = utils.data.load_dataset

    def counting_load(name, *args, **kw):
        loads.append(name)
        return real_load(name, *args, **kw)

    def fake_run_study(kind, dataset, settings):
        studied.append((kind, settings.name, dataset))
        return {"summary": pd.DataFrame([{"model": kind, "dataset": settings.name}])}
    monkeypatch.setattr(utils.data, "load_dataset", counting_load)
    monkeypatch.setattr(utils.study, "load_dataset", counting_load)   # a study given a name would load it there
    monkeypatch.setattr(workspace, "run_study", fake_run_study)
    S = dict(workspace.settings("tiny"), n_train=100, rule_n_train=100, n_valid=50, epochs=1, max_valid=20, n_test=50)
    data = {"mnist": utils.data.load_dataset("mnist", root=mnist_root, device="cpu")}  # the notebook's data cell
    ds = data["mnist"]
    assert ds.name == "mnist"
    logs, models = workspace.train_models(ds, S, kinds=("mlp", "cnn"), device="cpu", out=tmp_path / "runs")
    assert list(workspace.test_accuracies(models, ds, S)["dataset"]) == ["mnist", "mnist"]
    rule_logs, _ = workspace.train_rules(ds, S, device="cpu", out=tmp_path / "runs")
    summary = workspace.study(data, S, kinds=("mlp",), device="cpu")
    workspace.rule_study(data, S, summary, device="cpu")
    assert loads == ["mnist"]
    assert [k for k, _, _ in studied] == ["mlp", "mlp-fa", "mlp-dfa", "mlp-sign", "mlp-dtp", "mlp-sdtp", "mlp-pc"]
    assert all(name == "mnist" and d is ds for _, name, d in studied)
    for runs in (logs, rule_logs):
        table = concat_runs(runs.values())
        assert list(table["model"].unique()) == list(runs) and set(table["dataset"]) == {"mnist"}
        from_disk = concat_runs([tmp_path / "runs" / f"mnist_{k}" for k in runs])
        pd.testing.assert_frame_equal(table, from_disk, check_dtype=False)
    with pytest.raises(TypeError, match="Dataset"):
        workspace.train_models("mnist", S)  # a name is not loaded here: the notebook loads once

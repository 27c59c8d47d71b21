"""utils.plotting: every figure function, given a small log or table, writes a non-empty PNG with labelled axes."""
import numpy as np
import pandas as pd
import pytest
import torch

import matplotlib

from utils import plot_study, plotting
from utils.logger import TrainingLogger

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::utils.logger.LoggerOverheadWarning")  # hand-driven toy logs


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    matplotlib.pyplot.close("all")


class Fake:
    """Minimal compartmental-protocol estimator driven by hand."""

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.W = {"W1": torch.randn(5, 4, generator=g), "W2": torch.randn(3, 5, generator=g)}

    def named_weights(self):
        return self.W

    def predict_proba(self, X):
        return np.full((len(X), 3), 1 / 3)


def fake_log(name, seed=0, n=100, records=4, epochs=2, angle=True):
    clf, log = Fake(seed), TrainingLogger(torch.zeros(10, 1, 2, 2), torch.arange(10) % 3, records_per_epoch=records,
                                          name=name)
    log(clf, {"epoch": 0, "examples_seen": 0, "n_train": n})
    step = n // records
    for s in range(1, records * epochs + 1):
        clf.W = {k: v * 1.05 + 0.01 for k, v in clf.W.items()}
        info = {"epoch": (s - 1) // records, "examples_seen": s * step, "n_train": n,
                "train_loss": 1.0 / s, "train_acc": 1 - 0.5 / s}
        if angle:
            info["bp_angle"] = {"hidden1": 80.0 - s}
        log(clf, info)
    return log


def assert_below_axes(fig, legend):
    """The legend lies wholly below every axes of the figure: it covers no curve."""
    fig.canvas.draw()
    box = legend.get_window_extent()
    assert all(box.y1 <= ax.get_window_extent().y0 for ax in fig.axes), "the legend overlaps the axes"


def assert_png(path):
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_path(tmp_path, monkeypatch):
    monkeypatch.setattr(plotting, "FIGURES_DIR", tmp_path / "figures")
    assert plotting.figure_path("curves") == tmp_path / "figures" / "curves.png"
    assert plotting.figure_path("figures/sub/a.png") == tmp_path / "figures" / "sub" / "a.png"
    assert plotting.figure_path(tmp_path / "x.png") == tmp_path / "x.png"
    fig = plotting.plot_learning_curves(fake_log("a"), path="nested/dir/curves")
    assert fig is not None
    assert_png(tmp_path / "figures" / "nested" / "dir" / "curves.png")


@pytest.mark.parametrize("channels,normalized", [(1, False), (3, True)])
def test_plot_samples(tmp_path, channels, normalized):
    g = torch.Generator().manual_seed(0)
    X = torch.rand(40, channels, 8, 8, generator=g)
    if normalized:
        X = (X - 0.5) / 0.25
    y = torch.arange(40) % 4
    classes = ["zero", "one", "two", "three"]
    fig = plotting.plot_samples(X, y, classes, per_class=3, title="toy", path=tmp_path / "samples.png")
    assert_png(tmp_path / "samples.png")
    axes = fig.axes
    assert len(axes) == 12
    assert [ax.get_title() for ax in axes[:4]] == classes  # top row: class names
    assert fig._suptitle.get_text() == "toy"
    img = axes[0].get_images()[0].get_array()
    assert img.min() >= 0 and img.max() <= 1


def test_plot_learning_curves_several_runs(tmp_path):
    logs = [fake_log("mlp", 0), fake_log("cnn", 1)]
    fig = plotting.plot_learning_curves(logs, path=tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")
    ax_acc, ax_loss = fig.axes
    assert ax_acc.get_xlabel() == "examples seen" and ax_acc.get_ylabel() == "accuracy (%)"
    assert ax_loss.get_ylabel() == "cross-entropy loss (nats)"
    assert ax_acc.get_title() == "accuracy" and ax_loss.get_title() == "loss"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["mlp (training)", "mlp (validation)", "cnn (training)", "cnn (validation)"]
    assert_below_axes(fig, fig.legends[0])
    # accuracy in percent: the last training point is 100 * (1 - 0.5 / 8)
    assert ax_acc.lines[0].get_ydata()[-1] == pytest.approx(100 * (1 - 0.5 / 8))


def test_plot_learning_curves_grouped_runs_from_saved_table(tmp_path):
    from utils.runs import concat_runs
    for seed in (0, 1):
        fake_log(f"s{seed}", seed).save(tmp_path / "runs" / f"s{seed}", {"model": "comp", "dataset": "toy",
                                                                           "seed": seed})
    table = concat_runs(tmp_path / "runs")
    fig = plotting.plot_learning_curves(table, by="model", title="toy")
    ax_acc = fig.axes[0]
    assert len(ax_acc.lines) == 2 and len(ax_acc.collections) == 2  # one group: mean lines + std bands
    assert fig._suptitle.get_text() == "toy"


def test_plot_learning_curves_dict_and_thousands(tmp_path):
    log = fake_log("x", n=40_000)
    fig = plotting.plot_learning_curves({"renamed": log}, path=tmp_path / "c.png")
    assert fig.axes[0].get_xlabel() == "examples seen (thousands)"
    assert fig.legends[0].get_texts()[0].get_text() == "renamed (training)"


def test_plot_weight_dynamics(tmp_path):
    df = pd.concat([fake_log("mlp", 0).to_frame(), fake_log("comp", 1).to_frame()])
    fig = plotting.plot_weight_dynamics(df, path=tmp_path / "w.png")
    assert_png(tmp_path / "w.png")
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["mlp", "comp"]
    assert all(ax.get_xlabel() == "examples seen" for ax in fig.axes)
    assert fig.axes[0].get_ylabel().startswith("relative change")
    assert fig.axes[0].get_yscale() == "log"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["W1: hidden 1", "W2: output"]
    assert_below_axes(fig, fig.axes[0].get_legend())
    with pytest.raises(ValueError):
        plotting.plot_weight_dynamics(df[df["record"] == 0])


def test_plot_bp_angle(tmp_path):
    fig = plotting.plot_bp_angle([fake_log("comp", 0)], path=tmp_path / "angle.png")
    assert_png(tmp_path / "angle.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "examples seen" and ax.get_ylabel() == "angle to backprop update (degrees)"
    assert ax.get_title() == "comp"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["hidden 1", "90° (orthogonal)"]
    assert_below_axes(fig, fig.legends[0])
    with pytest.raises(ValueError, match="backprop angle"):
        plotting.plot_bp_angle(fake_log("mlp", angle=False))


def comparison_table():
    rows = []
    for dataset in ("mnist", "fashion", "cifar10"):
        for k, model in enumerate(("mlp", "cnn", "compartmental")):
            mean = 0.9 - 0.1 * k - (0.3 if dataset == "cifar10" else 0)
            rows.append({"model": model, "dataset": dataset, "best": mean + 0.01, "worst": mean - 0.02,
                         "mean": mean, "std": 0.01, "seed_best": mean + 0.005})
    return pd.DataFrame(rows)


def test_plot_comparison(tmp_path):
    fig = plot_study.plot_comparison(comparison_table(), path=tmp_path / "cmp.png")
    assert_png(tmp_path / "cmp.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "dataset" and ax.get_ylabel() == "cross-validated accuracy (%)"
    assert ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mnist", "fashion", "cifar10"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["mlp", "cnn", "compartmental", "best", "worst", "seed study's best"]
    assert len(ax.patches) == 9
    heights = sorted(p.get_height() for p in ax.patches)
    assert heights[-1] == pytest.approx(90.0)
    # without reference columns: no reference marker
    fig = plot_study.plot_comparison(comparison_table().drop(columns="seed_best"))
    assert "seed study's best" not in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    with pytest.raises(ValueError, match="std"):
        plot_study.plot_comparison(comparison_table().drop(columns="std"))


def test_plot_bo_trace(tmp_path):
    rows = []
    for model in ("mlp", "cnn"):
        for it in range(8):
            status = "diverged" if it == 3 else "ok"
            rows.append({"model": model, "dataset": "mnist", "iteration": it, "status": status,
                         "target": 0.1 if status != "ok" else 0.8 + 0.01 * ((it * 3) % 5)})
    fig = plot_study.plot_bo_trace(pd.DataFrame(rows), path=tmp_path / "bo.png")
    assert_png(tmp_path / "bo.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "iteration" and ax.get_ylabel() == "mean CV accuracy (%)"
    assert ax.get_title() == "Bayesian optimization trace"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "mlp / mnist (best so far)" in labels and "cnn / mnist (best so far)" in labels
    best = [ln for ln in ax.lines if ln.get_label() == "mlp / mnist (best so far)"][0].get_ydata()
    assert np.all(np.diff(best) >= 0) and best[-1] == pytest.approx(83.0)
    # a single group without model/dataset columns
    fig = plot_study.plot_bo_trace(pd.DataFrame({"iteration": [0, 1, 2], "target": [0.5, 0.7, 0.6]}))
    assert fig.axes[0].get_ylabel() == "mean CV accuracy (%)"


def test_layer_labels_are_readable():
    assert plotting.layer_labels(["net.1.weight", "net.3.weight", "net.5.weight"]) == {
        "net.1.weight": "hidden 1", "net.3.weight": "hidden 2", "net.5.weight": "output"}
    assert plotting.layer_labels(["features.0.weight", "features.4.weight", "classifier.weight"]) == {
        "features.0.weight": "conv 1", "features.4.weight": "conv 2", "classifier.weight": "output"}
    assert plotting.layer_labels(["W1", "W2", "W3", "Y1", "Y2", "hidden1", "other"]) == {
        "W1": "W1: hidden 1", "W2": "W2: hidden 2", "W3": "W3: output", "Y1": "Y1: feedback to hidden 1",
        "Y2": "Y2: feedback to hidden 2", "hidden1": "hidden 1", "other": "other"}


def test_weights_that_never_change_are_named_not_listed(tmp_path):
    df = fake_log("comp", 0).to_frame()
    fixed = df[df["layer"] == "W1"].assign(layer="Y1", rel_change=lambda d: d["rel_change"] * 0)
    fig = plotting.plot_weight_dynamics(pd.concat([df, fixed]), path=tmp_path / "w.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["W1: hidden 1", "W2: output"]
    assert len(ax.lines) == 2 and any("Y1: feedback to hidden 1" in t.get_text() for t in ax.texts)


def test_set_figures_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(plotting, "FIGURES_DIR", plotting.FIGURES_DIR)  # restored after the test
    monkeypatch.delenv("BIODL_FIGURES", raising=False)
    assert plotting.set_figures_dir(tmp_path / "quick") == tmp_path / "quick"
    assert plotting.figure_path("a") == tmp_path / "quick" / "a.png"
    assert plotting.set_figures_dir() == plotting.REPO_FIGURES
    monkeypatch.setenv("BIODL_FIGURES", str(tmp_path / "env"))
    assert plotting.set_figures_dir() == tmp_path / "env"

"""The training figures (samples, learning curves, weight dynamics, backprop angle) in the study's one style.

Each function takes logs or tables, returns the matplotlib Figure and, given `path`, saves it as a PNG: a relative
file name goes under the repository's `figures/` folder (``path="mlp_curves"`` -> figures/mlp_curves.png; a name that
already starts with "figures/" is not nested twice), an absolute path is used as it is; folders are created.
`set_figures_dir(path)` or the environment variable BIODL_FIGURES puts them elsewhere (the notebooks in quick mode:
runs/figures/, so that quick runs never overwrite the committed README figures).

    from utils import plotting
    plotting.plot_samples(ds.X_train, ds.y_train, ds.classes, title="MNIST", path="samples_mnist")
    plotting.plot_learning_curves([log_mlp, log_cnn], path="curves_mnist")       # loggers, or concat_runs(...)
    plotting.plot_weight_dynamics(table, by="model", path="weights_mnist")
    plotting.plot_bp_angle(log_comp, path="angle_mnist")

The study's figures (plot_comparison, plot_bo_trace, plot_rule_angles) are in utils/plot_study.py, in this style.

Logs: a `TrainingLogger`, a DataFrame from `TrainingLogger.to_frame()` / utils.runs' `load_run` / `concat_runs`, or
a list or a {label: log} dict of them. Accuracies are stored in [0, 1] and shown in percent.
"""
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import matplotlib

# without a display (a server, CI) use the file-only Agg backend; inside a notebook or with an explicit MPLBACKEND
# leave the choice to matplotlib
if (os.environ.get("MPLBACKEND") is None and "ipykernel" not in sys.modules
        and sys.platform.startswith("linux")
        and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from utils.runs import as_frame, curves  # noqa: E402

REPO_FIGURES = Path(__file__).resolve().parents[1] / "figures"  # the committed README figures
FIGURES_DIR = Path(os.environ.get("BIODL_FIGURES") or REPO_FIGURES)

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.8,
    "axes.prop_cycle": matplotlib.cycler(color=plt.get_cmap("tab10").colors),
}
PANEL = (5.0, 3.6)        # inches per panel: readable at a notebook's default width
EXAMPLES = "examples seen"
ACC_PCT = "accuracy (%)"


@contextmanager
def style():
    """The study's matplotlib style (used by every function here; usable around your own figures too)."""
    with plt.rc_context(STYLE):
        yield


def set_figures_dir(path=None):
    """Save figures with relative names under `path` from now on (None: $BIODL_FIGURES, else the repository's
    figures/); returns the folder."""
    global FIGURES_DIR
    FIGURES_DIR = Path(path if path is not None else os.environ.get("BIODL_FIGURES") or REPO_FIGURES)
    return FIGURES_DIR


def figure_path(path):
    """Where `path` is saved: relative names under FIGURES_DIR, ".png" added when there is no suffix."""
    p = Path(path)
    if not p.suffix:
        p = p.with_suffix(".png")
    if not p.is_absolute():
        parts = p.parts
        p = FIGURES_DIR.joinpath(*parts[1:]) if parts and parts[0] == "figures" else FIGURES_DIR / p
    return p


def save_figure(fig, path):
    """Save `fig` as described in `figure_path` (folders created); returns the path written."""
    p = figure_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with style():
        fig.savefig(p)
    return p


def saved(fig, path):
    """`fig`, saved first when `path` is given (save_figure): the last step of every figure function."""
    if path is not None:
        save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# inputs


def _label_of(log, i):
    name = getattr(log, "name", None)
    if name is not None:
        return str(name)
    if isinstance(log, pd.DataFrame) and "run" in log.columns and log["run"].nunique() == 1:
        return str(log["run"].iloc[0])
    return f"run {i}"


def log_table(logs):
    """One long DataFrame from a logger, a frame, a list of them or a {label: log} dict (label -> run column)."""
    if isinstance(logs, pd.DataFrame) or hasattr(logs, "to_frame"):
        df = as_frame(logs).copy()
        if "run" not in df.columns:
            df["run"] = "run"
        return df
    items = list(logs.items()) if isinstance(logs, dict) else [(None, log) for log in logs]
    frames = []
    for i, (label, log) in enumerate(items):
        df = as_frame(log).copy()
        if label is not None or "run" not in df.columns or not isinstance(log, pd.DataFrame):
            df["run"] = str(label) if label is not None else _label_of(log, i)
        frames.append(df)
    if not frames:
        raise ValueError("no logs to plot")
    return pd.concat(frames, ignore_index=True)


def check_columns(df, needed, what):
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs the column(s) {missing}; got {list(df.columns)}")


def mean_band(df, by, x, y):
    """Mean and standard deviation of y over the runs of each `by` group at each x (std NaN for a single run)."""
    g = df.dropna(subset=[y]).groupby([by, x], sort=True)[y]
    return g.mean().rename("mean").to_frame().join(g.std().rename("std")).join(g.size().rename("n")).reset_index()


def layer_labels(names):
    """Readable names of the logged weight matrices of one model: the MLP's net.1.weight ... -> hidden 1 ...,
    output; the CNN's features.K.weight -> conv 1 ..., classifier.weight -> output; the compartmental network's W1 ->
    W1: hidden 1, W<last> -> W<last>: output, Y1 -> Y1: feedback to hidden 1; hidden1 -> hidden 1. Others: as given."""
    names = [str(n) for n in names]
    labels = {n: n for n in names}

    def index(n):
        return int(n.split(".")[1])
    dense = sorted((n for n in names if re.fullmatch(r"net\.\d+\.weight", n)), key=index)
    for i, n in enumerate(dense, 1):
        labels[n] = "output" if i == len(dense) else f"hidden {i}"
    convs = sorted((n for n in names if re.fullmatch(r"features\.\d+\.weight", n)), key=index)
    labels.update({n: f"conv {i}" for i, n in enumerate(convs, 1)})
    if "classifier.weight" in labels:
        labels["classifier.weight"] = "output"
    forward = sorted((n for n in names if re.fullmatch(r"W\d+", n)), key=lambda n: int(n[1:]))
    for i, n in enumerate(forward, 1):
        labels[n] = f"{n}: output" if i == len(forward) else f"{n}: hidden {n[1:]}"
    labels.update({n: f"{n}: feedback to hidden {n[1:]}" for n in names if re.fullmatch(r"Y\d+", n)})
    labels.update({n: f"hidden {n[6:]}" for n in names if re.fullmatch(r"hidden\d+", n)})
    return labels


def _legend_below(fig, axes, ncol=4):
    """One legend for the figure, centred below its axes (never over the curves): the labels of all `axes`."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.tight_layout()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(ncol, len(labels)),
                   frameon=False)


def scale_x(values):
    """Examples seen in thousands when large (axis label says so)."""
    vmax = np.nanmax(values) if len(values) else 0
    return (1000.0, f"{EXAMPLES} (thousands)") if vmax >= 10_000 else (1.0, EXAMPLES)


# ----------------------------------------------------------------------------------------------------------------
# figures


def plot_samples(X, y, classes, per_class=4, title=None, path=None, seed=0):
    """A grid of sample images: one column per class (titled with its name), `per_class` examples in each.

    X: N x C x H x W (tensor on any device, or array) in [0, 1] or normalized (each image is then rescaled to [0, 1]
    for display); C = 1 (grey) or 3 (colour); only the images shown are copied to the CPU. y: N labels. classes: the
    class names, indexed by label.
    """
    def numpy(a):
        return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
    X = X if hasattr(X, "detach") else np.asarray(X)
    y = numpy(y)
    if X.ndim != 4 or X.shape[1] not in (1, 3):
        raise ValueError(f"X must be N x C x H x W with C = 1 or 3, got shape {tuple(X.shape)}")
    classes = list(classes)
    rng = np.random.default_rng(seed)
    labels = [c for c in range(len(classes)) if np.any(y == c)]
    n_cols, n_rows = len(labels), int(per_class)
    with style():
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.25 * n_cols + 0.3, 1.3 * n_rows + 0.5), squeeze=False)
        for j, c in enumerate(labels):
            idx = np.flatnonzero(y == c)
            pick = rng.choice(idx, size=min(n_rows, len(idx)), replace=False)
            for i in range(n_rows):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for s in ax.spines.values():
                    s.set_visible(False)
                if i >= len(pick):
                    ax.axis("off")
                    continue
                img = numpy(X[int(pick[i])]).astype(np.float64)
                lo, hi = img.min(), img.max()
                if lo < 0 or hi > 1:  # normalized input: rescale for display
                    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
                if img.shape[0] == 1:
                    ax.imshow(img[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(np.transpose(img, (1, 2, 0)), interpolation="nearest")
                if i == 0:
                    ax.set_title(str(classes[c]), fontsize=10)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return saved(fig, path)


def plot_learning_curves(logs, by="run", x="examples_seen", col=None, title=None, path=None):
    """Training (dashed) and validation (solid) accuracy and loss against examples seen; one colour per `by`
    value (runs, or e.g. "model" after concat_runs: several runs of a group are drawn as mean +- std band).
    Without `col`: accuracy and loss side by side. With `col` (e.g. "dataset"): one column per value, accuracy
    above and loss below (the seed's layout)."""
    df = log_table(logs)
    check_columns(df, [by, x, "train_acc", "valid_acc", "train_loss", "valid_loss"] + ([col] if col else []),
                  "plot_learning_curves")
    df = curves(df) if col is None else pd.concat([curves(g) for _, g in df.groupby(col, sort=False)])
    scale, xlabel = scale_x(df[x].to_numpy(dtype=float))
    columns = [None] if col is None else list(pd.unique(df[col]))
    with style():
        if col is None:
            fig, axes = plt.subplots(1, 2, figsize=(2 * PANEL[0], PANEL[1]), squeeze=False)
            panels = [(axes[0, 0], axes[0, 1], df, None)]
        else:
            fig, axes = plt.subplots(2, len(columns), figsize=(PANEL[0] * len(columns), 2 * PANEL[1]),
                                     squeeze=False, sharex="col")
            panels = [(axes[0, j], axes[1, j], df[df[col] == c], c) for j, c in enumerate(columns)]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        groups = list(pd.unique(df[by]))
        for ax_acc, ax_loss, part, name in panels:
            for k, group in enumerate(groups):
                color = colors[k % len(colors)]
                sub = part[part[by] == group]
                for metric, ax, factor in (("acc", ax_acc, 100.0), ("loss", ax_loss, 1.0)):
                    for split, ls in (("train", "--"), ("valid", "-")):
                        band = mean_band(sub, by, x, f"{split}_{metric}")
                        if band.empty:
                            continue
                        xs, m, s = band[x] / scale, band["mean"] * factor, band["std"] * factor
                        which = "training" if split == "train" else "validation"
                        ax.plot(xs, m, ls=ls, color=color, label=f"{group} ({which})")
                        if band["n"].max() > 1:
                            ax.fill_between(xs, m - s, m + s, color=color, alpha=0.15, linewidth=0)
            ax_acc.set_ylabel(ACC_PCT)
            ax_loss.set_ylabel("cross-entropy loss (nats)")
            ax_loss.set_xlabel(xlabel)
            if col is None:
                ax_acc.set_xlabel(xlabel)
                ax_acc.set_title("accuracy")
                ax_loss.set_title("loss")
            else:
                ax_acc.set_title(str(name))
        if title:
            fig.suptitle(title)
        _legend_below(fig, [ax for ax, _, _, _ in panels], ncol=2 if col is None else 2 * min(3, len(groups)))
    return saved(fig, path)


def _layer_panels(df, by, x, value, draw, finish):
    """One panel per `by` value, one line per layer of `value` (mean over runs) against x: draw(ax, band, scale,
    layer) plots a layer's band (columns x, mean, std, n), finish(ax, rows) completes a panel. Returns fig, axes."""
    groups = list(pd.unique(df[by]))
    scale, xlabel = scale_x(df[x].to_numpy(dtype=float))
    fig, axes = plt.subplots(1, len(groups), figsize=(PANEL[0] * len(groups), PANEL[1]), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        sub = df[df[by] == group]
        labels = layer_labels(pd.unique(sub["layer"]))
        for layer in pd.unique(sub["layer"]):
            draw(ax, mean_band(sub[sub["layer"] == layer], "layer", x, value), scale, labels[str(layer)])
        ax.set_title(str(group))
        ax.set_xlabel(xlabel)
        finish(ax, sub)
    return fig, axes


def plot_weight_dynamics(logs, by="run", x="examples_seen", logy=True, title=None, path=None):
    """Relative change of each layer's weights ||W_t - W_(t-1)|| / ||W_t|| between records against examples seen:
    one panel per `by` value (model or run), one line per layer (mean over the runs of a panel)."""
    df = log_table(logs)
    check_columns(df, [by, x, "layer", "rel_change"], "plot_weight_dynamics")
    df = df[df["rel_change"].notna() & df["layer"].notna()]
    if df.empty:
        raise ValueError("no weight changes to plot (a log needs at least two records)")

    unchanged = []  # layers that never moved (e.g. fixed feedback weights): nothing to draw on a log axis

    def draw(ax, band, scale, layer):
        if logy and not (band["mean"] > 0).any():
            unchanged.append(layer)
            return
        ax.plot(band[x] / scale, band["mean"], marker=".", markersize=3, label=layer)

    def finish(ax, rows):
        if logy:
            ax.set_yscale("log")
        if unchanged:
            ax.text(0.02, 0.02, "not drawn, never changed: " + ", ".join(unchanged), transform=ax.transAxes,
                    fontsize=8, color="0.35", va="bottom")
            unchanged.clear()
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)  # below, under the x label

    with style():
        fig, axes = _layer_panels(df, by, x, "rel_change", draw, finish)
        rows = max(len(ax.get_legend_handles_labels()[0]) for ax in axes[0])
        fig.set_figheight(PANEL[1] + 0.5 + 0.2 * rows)  # room for the legends below the panels
        axes[0, 0].set_ylabel("relative change ‖ΔW‖ / ‖W‖ per record")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return saved(fig, path)


def plot_bp_angle(logs, by="run", x="examples_seen", title=None, path=None):
    """The compartmental network's angle between each hidden layer's update and the backpropagation update
    (degrees) against examples seen; one line per hidden layer, one panel per `by` value; 90 degrees dotted."""
    df = log_table(logs)
    check_columns(df, [by, x, "layer", "bp_angle"], "plot_bp_angle")
    df = df[df["bp_angle"].notna()]
    if df.empty:
        raise ValueError("no backprop angle in these logs (turn the compartmental network's diagnostic on)")

    def draw(ax, band, scale, layer):
        line, = ax.plot(band[x] / scale, band["mean"], label=layer)
        if band["n"].max() > 1:
            ax.fill_between(band[x] / scale, band["mean"] - band["std"], band["mean"] + band["std"],
                            color=line.get_color(), alpha=0.15, linewidth=0)

    def finish(ax, rows):
        ax.axhline(90, color="0.4", ls=":", lw=1, label="90° (orthogonal)")
        ax.set_ylim(0, max(100, float(np.nanmax(rows["bp_angle"])) + 5))

    with style():
        fig, axes = _layer_panels(df, by, x, "bp_angle", draw, finish)
        axes[0, 0].set_ylabel("angle to backprop update (degrees)")
        if title:
            fig.suptitle(title)
        _legend_below(fig, axes[0])
    return saved(fig, path)

"""The study's figures: cross-validated accuracies compared, Bayesian optimization traces, learning rules' angles.

Same style and saving rules as utils/plotting.py (`path`: a PNG under figures/, see plotting.figure_path).

    from utils.plot_study import plot_comparison, plot_bo_trace, plot_rule_angles
    plot_comparison(results, path="comparison")           # model, dataset, best, worst, mean, std
    plot_bo_trace(trace, path="bo_trace")                 # iteration, target, status (+ model, dataset)
    plot_rule_angles(concat_runs(run_dirs), path="rule_angles")
"""
from utils.plotting import PANEL, check_columns, log_table, mean_band, saved, scale_x, style  # first: the backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

REFERENCE_LABELS = {"seed_best": "seed study's best"}  # legend names of plot_comparison's reference columns


def plot_comparison(results, reference=None, title=None, path=None):
    """Grouped bar chart of cross-validated accuracy: per dataset (groups) and model (bars), the mean with a +- std
    error bar, the best (▲) and worst (▼) as markers. `results`: DataFrame with columns model, dataset, best,
    worst, mean, std (accuracies in [0, 1]). `reference`: optional column name(s) (e.g. "seed_best") drawn as
    diamonds/other markers; None draws every extra numeric column."""
    df = pd.DataFrame(results).copy()
    check_columns(df, ["model", "dataset", "best", "worst", "mean", "std"], "plot_comparison")
    base = {"model", "dataset", "best", "worst", "mean", "std"}
    if reference is None:
        reference = [c for c in df.columns if c not in base and pd.api.types.is_numeric_dtype(df[c])]
    elif isinstance(reference, str):
        reference = [reference]
    datasets, models = list(pd.unique(df["dataset"])), list(pd.unique(df["model"]))
    width = 0.8 / max(len(models), 1)
    ref_markers = ["D", "*", "P", "X", "s"]
    with style():
        fig, ax = plt.subplots(figsize=(max(PANEL[0], 1.2 + 0.9 * len(datasets) * max(len(models), 1) * 0.6 + 2),
                                        PANEL[1] + 0.4))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        handles = []
        for m_i, model in enumerate(models):
            xs, rows = [], []
            for d_i, dataset in enumerate(datasets):
                row = df[(df["model"] == model) & (df["dataset"] == dataset)]
                if len(row):
                    xs.append(d_i - 0.4 + width * (m_i + 0.5))
                    rows.append(row.iloc[0])
            if not rows:
                continue
            sub = pd.DataFrame(rows)
            xs = np.array(xs)
            color = colors[m_i % len(colors)]
            bars = ax.bar(xs, 100 * sub["mean"], width * 0.9, yerr=100 * sub["std"].fillna(0), capsize=3,
                          color=color, alpha=0.85, label=str(model), error_kw={"elinewidth": 1})
            handles.append(bars)
            ax.plot(xs, 100 * sub["best"], "^", color="k", ms=5, ls="none")
            ax.plot(xs, 100 * sub["worst"], "v", color="k", ms=5, ls="none")
            for r_i, ref in enumerate(reference):
                if ref in sub:
                    ax.plot(xs, 100 * sub[ref].astype(float), ref_markers[r_i % len(ref_markers)],
                            color="tab:red" if r_i == 0 else "tab:purple", ms=6, ls="none", mfc="none")
        # legend: models (bars), then the markers
        handles += ax.plot([], [], "^", color="k", ls="none", label="best")
        handles += ax.plot([], [], "v", color="k", ls="none", label="worst")
        for r_i, ref in enumerate(reference):
            handles += ax.plot([], [], ref_markers[r_i % len(ref_markers)], ls="none", mfc="none",
                               label=REFERENCE_LABELS.get(ref, str(ref)),
                               color="tab:red" if r_i == 0 else "tab:purple")
        ax.set_xticks(range(len(datasets)))
        ax.set_xticklabels([str(d) for d in datasets])
        ax.set_xlabel("dataset")
        ax.set_ylabel("cross-validated accuracy (%)")
        lo = 100 * float(np.nanmin(df[["worst", "mean"]].to_numpy(dtype=float)))
        ax.set_ylim(max(0.0, min(lo - 5, 100 * float(np.nanmin(df["mean"] - df["std"].fillna(0))) - 5)), 100.5)
        ax.set_title(title or "comparison of approaches (mean ± std over folds)")
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(axis="x", visible=False)
        fig.tight_layout()
    return saved(fig, path)


def plot_bo_trace(trace, group=("model", "dataset"), title=None, path=None):
    """Bayesian optimization trace: the objective (mean CV accuracy) of each iteration as points and the best so
    far as a line, one colour per group (the `group` columns present, e.g. model and dataset). Iterations whose
    status is not "ok" (diverged, failed) are drawn as crosses on the lower edge and ignored by the best so far;
    the y range follows the successful iterations.
    `trace`: DataFrame with columns iteration, target (in [0, 1]), status (optional, default "ok")."""
    df = pd.DataFrame(trace).copy()
    check_columns(df, ["iteration", "target"], "plot_bo_trace")
    if "status" not in df.columns:
        df["status"] = "ok"
    df["target"] = pd.to_numeric(df["target"], errors="coerce")
    df["ok_"] = ((df["status"].astype(str).str.lower() == "ok") & df["target"].notna()
                 & np.isfinite(df["target"].astype(float)))
    keys = [c for c in ([group] if isinstance(group, str) else list(group or ())) if c in df.columns]
    good = 100 * df.loc[df["ok_"], "target"]
    if len(good):
        span = max(float(good.max() - good.min()), 1.0)
        y_lo, y_hi = max(0.0, float(good.min()) - 0.1 * span), min(100.0, float(good.max()) + 0.1 * span)
    else:
        y_lo, y_hi = 0.0, 100.0
    with style():
        fig, ax = plt.subplots(figsize=(PANEL[0] * 2.0, PANEL[1] + 0.3))  # room for the legend beside it
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        grouped = df.groupby(keys, sort=False) if keys else [((), df)]
        for k, (name, sub) in enumerate(grouped):
            name = name if isinstance(name, tuple) else (name,)
            label = " / ".join(str(v) for v in name) if keys else "trace"
            color = colors[k % len(colors)]
            sub = sub.sort_values("iteration")
            target, ok = sub["target"], sub["ok_"]
            ax.plot(sub["iteration"][ok], 100 * target[ok], "o", color=color, ms=4, alpha=0.6)
            if (~ok).any():  # failures: on the lower edge (their target is a penalty or missing)
                ax.plot(sub["iteration"][~ok], np.full(int((~ok).sum()), y_lo), "x", color=color, ms=6,
                        clip_on=False)
            best = target.where(ok).cummax().ffill()
            ax.plot(sub["iteration"], 100 * best, "-", color=color, drawstyle="steps-post",
                    label=f"{label} (best so far)")
        ax.set_ylim(y_lo, y_hi)
        ax.plot([], [], "o", color="0.4", ms=4, label="iteration (status ok)")
        if (~df["ok_"]).any():
            ax.plot([], [], "x", color="0.4", ms=6, label="iteration (status not ok: diverged, oom, error, invalid)")
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
        ax.set_ylabel("mean CV accuracy (%)")
        ax.set_title(title or "Bayesian optimization trace")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: never over the points
        fig.tight_layout()
    return saved(fig, path)


def plot_rule_angles(logs, by="dataset", line="model", x="examples_seen", title=None, path=None):
    """The angle between each learning rule's hidden-layer update and backprop's (degrees) against examples seen:
    one panel per `by` value (the dataset), one line per `line` value (the model, e.g. "mlp-fa", "compartmental")
    and hidden layer, mean over runs; 90 degrees dotted. `logs`: concat_runs(...) (model and dataset columns), a
    logger, a frame or a {label: log} dict (label -> the run column; use by="run" or line="run" then)."""
    df = log_table(logs)
    check_columns(df, [by, line, x, "layer", "bp_angle"], "plot_rule_angles")
    df = df[df["bp_angle"].notna()]
    if df.empty:
        raise ValueError("no backprop angle in these logs (MLP / CNN logs record it; the compartmental network "
                         "with record_backprop_angle=True)")
    groups = list(pd.unique(df[by]))
    scale, xlabel = scale_x(df[x].to_numpy(dtype=float))
    with style():
        fig, axes = plt.subplots(1, len(groups), figsize=(PANEL[0] * len(groups), PANEL[1]), squeeze=False,
                                 sharey=True)
        for ax, group in zip(axes[0], groups):
            sub = df[df[by] == group]
            for (name, layer), rows in sub.groupby([line, "layer"], sort=False):
                band = mean_band(rows, "layer", x, "bp_angle")
                ax.plot(band[x] / scale, band["mean"], label=f"{name} {layer}")
            ax.axhline(90, color="0.4", ls=":", lw=1, label="90° (orthogonal)")
            ax.set_ylim(-2, max(100, float(np.nanmax(sub["bp_angle"])) + 5))
            ax.set_title(str(group))
            ax.set_xlabel(xlabel)
            ax.legend(loc="best", fontsize="small")
        axes[0, 0].set_ylabel("angle to backprop update (degrees)")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return saved(fig, path)

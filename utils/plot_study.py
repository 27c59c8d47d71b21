"""The study's figures: cross-validated accuracies compared, Bayesian optimization traces, learning rules' angles.

Same style and saving rules as utils/plotting.py (`path`: a PNG under figures/, see plotting.figure_path).

    from utils.plot_study import plot_comparison, plot_bo_trace, plot_rule_angles, plot_study
    plot_comparison(results, path="comparison")           # model, dataset, best, worst, mean, std
    plot_bo_trace(trace, path="bo_trace")                 # iteration, target, status (+ model, dataset)
    plot_study(load_results("logs"), reference={("mlp", "mnist"): 0.968}, path="study")   # per dataset
    plot_rule_angles(concat_runs(run_dirs), path="rule_angles")

    python -m utils.plot_study logs/cpu --path figures/study.png   # the study figure of the studies under a folder
"""
from utils.plotting import (PANEL, _legend_below, check_columns, figure_path, log_table, mean_band,  # first:
                            saved, scale_x, style)  # the backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

REFERENCE_LABELS = {"seed_best": "seed study's best"}  # legend names of plot_comparison's reference columns
MODEL_ORDER = ("mlp", "mlp-fa", "mlp-dfa", "mlp-sign", "cnn", "cnn-fa", "cnn-dfa", "cnn-sign", "compartmental")
DATASET_ORDER = ("mnist", "fashion", "cifar10")   # plot_study's columns and bars in this order (others after)
FAILED = "diverged, oom, error, killed"   # plot_study's legend name of the failures (scored at chance)


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


def plot_study(evals, reference=None, title=None, path=None):
    """The study figure, one column per dataset. Above: each evaluation's mean CV accuracy against its iteration
    (points, one colour per model; failures as crosses at the chance score they count as) and the best so far
    (a step line). Below: the distribution per model, a violin with every evaluation's point beside it and the best
    marked. Both: chance (1 / classes) as a dashed line, `reference` (e.g. the seed study's best, {(model, dataset):
    accuracy in [0, 1]}) as stars, the y-axis from 0 to 100 %. `evals`: utils.study_log.load_results (model,
    dataset, iteration, status, target; n_classes for chance); invalid proposals are left out."""
    df = pd.DataFrame(evals)
    check_columns(df, ["model", "dataset", "iteration", "status", "target"], "plot_study")
    df = df[df["status"] != "invalid"].copy()
    if df.empty:
        raise ValueError("plot_study: no trained evaluations to draw")
    df["target"] = 100 * pd.to_numeric(df["target"], errors="coerce")
    reference = {k: 100 * float(v) for k, v in (reference or {}).items() if v is not None}
    datasets, models = _ordered(df["dataset"], DATASET_ORDER), _ordered(df["model"], MODEL_ORDER)
    with style():
        width = [max(3, df.loc[df["dataset"] == d, "model"].nunique()) / 3 for d in datasets]   # room per model
        fig, axes = plt.subplots(2, len(datasets), figsize=(PANEL[0] * sum(width), 2 * PANEL[1] + 0.6),
                                 squeeze=False, gridspec_kw=dict(width_ratios=width))
        colors = {m: c for m, c in zip(models, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)}
        for j, dataset in enumerate(datasets):
            sub = df[df["dataset"] == dataset]
            _trace_panel(axes[0, j], sub, models, colors, reference, dataset)
            _distribution_panel(axes[1, j], sub, models, colors, reference, dataset)
            for ax in axes[:, j]:
                chance = _chance(sub)
                if chance is not None:
                    ax.axhline(chance, color="0.35", ls="--", lw=1, zorder=0, label="chance")
                ax.set_ylim(0, 100)
            axes[0, j].set_title(str(dataset))
        axes[0, 0].set_ylabel("mean CV accuracy (%)")
        axes[1, 0].set_ylabel("mean CV accuracy (%)")
        if title:
            fig.suptitle(title)
        _legend_below(fig, axes.ravel(), ncol=6)
    return saved(fig, path)


def _ordered(values, order):
    """The distinct values, those of `order` first in its order, the others as they come."""
    seen = list(pd.unique(values))
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def _chance(sub):
    n = pd.to_numeric(sub.get("n_classes", pd.Series(dtype=float)), errors="coerce").dropna()
    return 100.0 / float(n.iloc[0]) if len(n) and n.iloc[0] > 0 else None


def _trace_panel(ax, sub, models, colors, reference, dataset):
    """Each evaluation against its iteration and the best so far, per model; the reference as a star at the end."""
    right = int(sub["iteration"].max()) + 1
    for model in models:
        rows = sub[sub["model"] == model].sort_values("iteration")
        if rows.empty:
            continue
        ok, c = rows["status"] == "ok", colors[model]
        ax.plot(rows["iteration"][ok], rows["target"][ok], "o", color=c, ms=3.5, alpha=0.55, mew=0)
        ax.plot(rows["iteration"][~ok], rows["target"][~ok], "x", color=c, ms=5, alpha=0.8)
        best = rows["target"].where(ok).cummax().ffill()
        ax.plot(rows["iteration"], best, "-", color=c, drawstyle="steps-post", label=f"{model}: best so far")
        if (model, dataset) in reference:
            ax.plot([right], [reference[(model, dataset)]], "*", color=c, ms=11, mec="k", mew=0.6,
                    clip_on=False)
    ax.set_xlabel("iteration (evaluation)")
    ax.set_xlim(-1, right + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _distribution_panel(ax, sub, models, colors, reference, dataset):
    """Per model: a violin of the trained evaluations (failures left out of it, drawn as crosses at chance), their
    points jittered over it, the best as a bar, the reference as a star; the tick says how many evaluations."""
    rng = np.random.default_rng(0)
    present = [m for m in models if (sub["model"] == m).any()]
    for i, model in enumerate(present):
        rows, c = sub[sub["model"] == model], colors[model]
        ok = (rows["status"] == "ok").to_numpy()
        values = rows["target"][ok].dropna().to_numpy(dtype=float)
        if len(values) > 1 and np.ptp(values) > 0:
            body = ax.violinplot([values], positions=[i], widths=0.7, showextrema=False)["bodies"][0]
            body.set_facecolor(c)
            body.set_alpha(0.3)
        jitter = rng.uniform(-0.12, 0.12, len(rows))
        ax.plot(i + jitter[ok], rows["target"][ok], "o", color=c, ms=3.5, alpha=0.75, mew=0)
        ax.plot(i + jitter[~ok], rows["target"][~ok], "x", color=c, ms=5, alpha=0.8)
        if ok.any():
            ax.plot([i - 0.3, i + 0.3], [rows["target"][ok].max()] * 2, "-", color="k", lw=1.5)
        if (model, dataset) in reference:
            ax.plot([i + 0.38], [reference[(model, dataset)]], "*", color=c, ms=11, mec="k", mew=0.6)
    ax.set_xticks(range(len(present)))
    many = len(present) > 3                               # narrower ticks, so that the labels do not overlap
    ax.set_xticklabels([f"{m}\n({(sub['model'] == m).sum()}{'' if many else ' evaluations'})" for m in present],
                       fontsize="small" if many else None)
    ax.set_xlim(-0.6, len(present) - 0.4)
    ax.grid(axis="x", visible=False)
    ax.plot([], [], "-", color="k", lw=1.5, label="best of a model")
    ax.plot([], [], "o", color="0.4", ms=3.5, label="an evaluation (ok)")
    ax.plot([], [], "x", color="0.4", ms=5, label=f"failed ({FAILED}): scored at chance")
    if any(d == dataset for _, d in reference):
        ax.plot([], [], "*", color="0.6", mec="k", mew=0.6, ms=11, label="seed study's best")


def main(argv=None):
    """python -m utils.plot_study FOLDER [--path PNG]: the study figure of the studies under FOLDER, with the seed
    study's best (utils.results.SEED_STUDY) as the reference."""
    import argparse

    from utils.study_log import load_results
    from utils.results import SEED_STUDY
    p = argparse.ArgumentParser(prog="python -m utils.plot_study", description=main.__doc__.splitlines()[0])
    p.add_argument("folder", help="a folder of studies (utils.study's --out)")
    p.add_argument("--path", default="study", help="where the PNG goes (relative: under figures/)")
    args = p.parse_args(argv)
    evals = load_results(args.folder)
    if evals.empty:
        p.error(f"no study logs under {args.folder}")
    plot_study(evals, reference={k: v / 100 for k, v in SEED_STUDY.items()}, path=args.path)
    print(f"wrote {figure_path(args.path)}")


if __name__ == "__main__":
    main()

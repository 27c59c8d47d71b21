"""utils.study, issues 27 and 30: sizes refused up front, an --out that cannot be written, a refusal for memory
scored "oom", the help text, the named protocols (one record layout, logs that summarize with 3 fold scores,
provenance and wall time), --max-minutes and resuming by the same command."""
import json
import os
import subprocess
import sys

import pytest
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

import utils.study
from test_study import read, smooth_objective, tiny_dataset
from utils.errors import InsufficientMemory
from utils.study import PROTOCOLS, StudySettings, build_parser, main, protocol_settings, run_study
from utils.study_log import StudyError, summarize

SEED_ROWS = [(m, d) for m in ("mlp", "cnn", "compartmental") for d in ("mnist", "fashion", "cifar10")]
RULE_ROWS = [("mlp-fa", "mnist"), ("mlp-dfa", "mnist"), ("mlp-sign", "mnist")]


def three_folds(hp):
    s = smooth_objective(hp)[0]
    return [s, s - 0.01, s + 0.01]


# ----------------------------------------------------------------------------------------------------------------
# issue 27, item 11: sizes


@pytest.mark.parametrize("option", [["--subset", "-5"], ["--subset", "0"], ["--model", "compartmental",
                                    "--batch-size", "0"], ["--model", "compartmental", "--batch-size", "-3"],
                                    ["--retrain-subset", "0"], ["--test-subset", "-1"], ["--init-points", "-1"],
                                    ["--test-phase", "0"], ["--max-minutes", "-2"], ["--folds", "1"]])
def test_impossible_sizes_are_refused_before_anything_runs(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*option, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{option[-2]} {option[-1]}" in err and ("positive" in err or "2 folds" in err)
    assert not list(tmp_path.iterdir())   # nothing written, nothing trained


def test_too_few_examples_for_the_folds_and_classes_name_the_minimum(tmp_path, mnist_root, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--subset", "5", "--data-root", str(mnist_root), "--out", str(tmp_path)])
    assert "give --subset 30 or more" in str(e.value.code) and "3-fold" in str(e.value.code)
    ds = tiny_dataset(n=20, n_classes=4)   # 4 classes x 3 folds = 12 <= 20, but a subset of 8 is too few
    with pytest.raises(ValueError, match="at least 12"):
        run_study("mlp", ds, subset=8, out=tmp_path, evaluate=smooth_objective, verbose=0)
    with pytest.raises(ValueError, match="at least 4"):
        run_study("mlp", ds, retrain_subset=2, out=tmp_path, evaluate=smooth_objective, verbose=0)
    for bad in (dict(subset=0), dict(subset=-5), dict(fixed={"batch_size": -3}), dict(fixed={"batch_size": 0}),
                dict(epochs=0), dict(folds=1), dict(init_points=-1)):
        with pytest.raises(ValueError, match="give"):
            StudySettings(**bad)


# ----------------------------------------------------------------------------------------------------------------
# item 13: an --out that cannot be written


def test_out_that_is_a_file_is_refused_up_front(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (f, f / "below"):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(out), "--iterations", "1"])
        assert "is a file, not a folder" in str(e.value.code) and "--out" in str(e.value.code)
    with pytest.raises(StudyError, match="is a file"):
        run_study("mlp", tiny_dataset(), out=f, evaluate=smooth_objective, verbose=0)


def _read_only(folder):
    """Make `folder` unwritable, also for root (chattr +i) where the mode is not enough; False when impossible."""
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.write_text("")
    except OSError:
        return True
    probe.unlink()
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def test_read_only_out_is_refused_up_front(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _read_only(ro):
        pytest.skip("cannot make a folder read-only here")
    try:
        with pytest.raises(SystemExit) as e:
            main(["--out", str(ro), "--iterations", "1"])
        assert "cannot write there" in str(e.value.code) and "a folder you can write to" in str(e.value.code)
        with pytest.raises(StudyError, match="cannot write there"):
            run_study("mlp", tiny_dataset(), out=ro / "sub", evaluate=smooth_objective, verbose=0)
    finally:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        ro.chmod(0o755)


# ----------------------------------------------------------------------------------------------------------------
# item 6: an estimator's refusal for memory


class Refuses(BaseEstimator, ClassifierMixin):
    """An estimator that refuses up front (as the real ones do, utils.memory.check_fits) above 100 units."""

    def __init__(self, hidden_sizes=(10,), lr=1e-3, batch_size=10, max_epochs=1, seed=0, device=None, verbose=0):
        self.hidden_sizes, self.lr, self.batch_size = hidden_sizes, lr, batch_size
        self.max_epochs, self.seed, self.device, self.verbose = max_epochs, seed, device, verbose

    def fit(self, X, y):
        if max(self.hidden_sizes) > 100 or len(y) > 100:   # the whole training split (120) does not fit either
            raise InsufficientMemory(f"an MLP {self.hidden_sizes} needs about 80.0 GiB but 17.6 GiB is available "
                                     f"on cpu; the largest that fits: --n-hidden 100")
        self.classes_ = torch.unique(y)
        return self

    def predict(self, X):
        return torch.zeros(len(X), dtype=torch.long)

    def score(self, X, y):
        return float((self.predict(X) == y.cpu()).float().mean())


def test_a_refusal_for_memory_is_scored_oom_and_the_study_goes_on(tmp_path, monkeypatch):
    fitted = []

    def make(model, **kw):
        fitted.append(kw["hidden_sizes"])
        return Refuses(**{k: v for k, v in kw.items() if k in Refuses().get_params()})

    monkeypatch.setattr(utils.cluster, "make_classifier", make)
    monkeypatch.setattr(utils.evaluation, "make_classifier", make)
    res = run_study("mlp", tiny_dataset(), iterations=6, folds=2, epochs=1, out=tmp_path, init_points=6,
                    verbose=0)
    recs = read(res["study_dir"])
    assert len(recs) == 6 and {r["status"] for r in recs} == {"oom", "ok"}
    for r in recs:
        big = max(r["hyperparameters"]["hidden_sizes"]) > 100
        assert (r["status"] == "oom") == big
        if big:
            assert r["target"] == 0.25 and r["fold_scores"] is None and "InsufficientMemory" in r["reason"]
            assert "the largest that fits" in r["reason"]
    row = res["summary"].iloc[0]
    assert row.n_failed == sum(r["status"] == "oom" for r in recs) and row.n_evals == 6
    best = json.loads((res["study_dir"] / "best.json").read_text())   # the retraining refused too: recorded
    assert best["status"] == "oom" and best["test_acc"] is None and "InsufficientMemory" in best["reason"]
    assert res["test_acc"] is None and row.test_acc != row.test_acc   # NaN in the table


# ----------------------------------------------------------------------------------------------------------------
# item 19: the help


def test_help_says_each_default_once_and_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: cuda when available)" in text and text.count("default") == text.count("default") // 1
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    for option in ("--retrain-subset", "--test-subset", "--quiet"):
        assert option in text
    assert "whole training split" in text and "whole test split" in text and "no progress bar" in text


# ----------------------------------------------------------------------------------------------------------------
# issue 30: the protocols


def test_every_protocol_row_is_three_folds_at_the_seeds_counts():
    seed = PROTOCOLS["seed"]["*"]
    assert (seed.subset, seed.epochs, seed.iterations, seed.folds) == (None, 10, 50, 3)
    for model, dataset in SEED_ROWS + RULE_ROWS:
        for name in PROTOCOLS:
            S = protocol_settings(name, model, dataset)
            assert S.folds == 3 and S.protocol == name and S.retrain
            assert S.retrain_subset is None and S.test_subset is None   # the best: whole splits
            least = 30 if model == "compartmental" and dataset != "mnist" else 50
            assert S.iterations >= least, (name, model, dataset)
    comp = protocol_settings("cpu", "compartmental", "cifar10")
    assert comp.fixed["l_f_phase_test"] >= 1 and comp.fixed["batch_size"] >= 1
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_settings("gpu", "mlp", "mnist")


def test_protocols_give_the_same_record_layout(tmp_path):
    """Both presets on tiny data (named mnist, so that the rows' sizes apply; the subsets exceed it: all of it)."""
    layouts = {}
    for name in PROTOCOLS:
        S = protocol_settings(name, "mlp", "mnist", out=tmp_path / name, iterations=2, init_points=1,
                              evaluate=three_folds, name="mnist", verbose=0)
        res = run_study("mlp", tiny_dataset(), S, epochs=1)
        d = res["study_dir"]
        layouts[name] = ([sorted(r) for r in read(d)], sorted(json.loads((d / "config.json").read_text())),
                         sorted(json.loads((d / "best.json").read_text())),
                         sorted(json.loads((d / "invocations.jsonl").read_text().splitlines()[0])),
                         list(res["summary"].columns))
        assert json.loads((d / "config.json").read_text())["protocol"] == name
    assert layouts["cpu"] == layouts["seed"]


def test_a_protocol_study_log_summarizes_with_three_fold_scores_and_its_provenance(tmp_path):
    S = protocol_settings("cpu", "mlp", "mnist", out=tmp_path, iterations=3, init_points=2, name="mnist",
                          verbose=0)
    res = run_study("mlp", tiny_dataset(), S)   # real training at the row's epochs on the tiny data
    row = summarize(tmp_path).iloc[0]
    assert (row.model, row.dataset, row.n_evals) == ("mlp", "mnist", 3) and row.wall_s > 0
    assert all(len(r["fold_scores"]) == 3 for r in read(res["study_dir"]))
    config = json.loads((res["study_dir"] / "config.json").read_text())
    assert (config["epochs"], config["folds"], config["protocol"]) == (4, 3, "cpu")
    prov = config["provenance"]
    assert {"commit", "versions", "machine", "command", "started"} <= set(prov)
    best = json.loads((res["study_dir"] / "best.json").read_text())
    assert best["n_train"] == 120 and best["n_test"] == 120 and best["study"]["protocol"] == "cpu"
    assert best["provenance"]["machine"]["cores"] == os.cpu_count() and best["time_s"] > 0


# ----------------------------------------------------------------------------------------------------------------
# issue 30: pieces of --max-minutes, resumed by the same command


def test_max_minutes_stops_after_the_running_evaluation_and_the_same_command_resumes(tmp_path, mnist_root,
                                                                                   monkeypatch, capsys):
    log = tmp_path / "mlp_mnist" / "evals.jsonl"
    # the clock: the deadline passes once 2 evaluations are logged (no test may depend on the machine's speed)
    monkeypatch.setattr(utils.study, "_past", lambda deadline: deadline is not None and log.exists()
                        and len(log.read_text().splitlines()) >= 2)
    argv = ["--data-root", str(mnist_root), "--subset", "100", "--iterations", "4", "--folds", "2", "--epochs", "1",
            "--init-points", "2", "--out", str(tmp_path), "--retrain-subset", "100", "--test-subset", "100",
            "--max-minutes", "60", "--quiet", "--model", "mlp", "cnn"]
    main(argv)   # returns: exit status 0
    out = capsys.readouterr().out
    assert "stopped after --max-minutes 60 at mlp/mnist (2 evaluations logged" in out
    assert "Resume with the same command: python -m utils.study --data-root" in out
    assert len(read(tmp_path / "mlp_mnist")) == 2 and not (tmp_path / "mlp_mnist" / "best.json").exists()
    assert not (tmp_path / "cnn_mnist").exists()   # the next row waits for the next piece
    monkeypatch.setattr(utils.study, "_past", lambda deadline: False)
    main(argv)
    assert "stopped" not in capsys.readouterr().out
    for model in ("mlp", "cnn"):
        assert [r["iteration"] for r in read(tmp_path / f"{model}_mnist") if r["status"] != "invalid"] == [0, 1, 2, 3]
        assert json.loads((tmp_path / f"{model}_mnist" / "best.json").read_text())["n_evals"] == 4
    pieces = [json.loads(x) for x in (tmp_path / "mlp_mnist" / "invocations.jsonl").read_text().splitlines()]
    assert [(p["evals_before"], p["evals_after"], p["complete"]) for p in pieces] == [(0, 2, False), (2, 4, True)]


def test_protocol_on_the_command_line_sets_each_rows_sizes(tmp_path, mnist_root):
    """--protocol cpu with a size given beside it: the given one wins, the others are the row's."""
    main(["--protocol", "cpu", "--data-root", str(mnist_root), "--subset", "30", "--iterations", "1",
          "--epochs", "1", "--out", str(tmp_path), "--quiet", "--no-retrain", "--model", "mlp", "compartmental"])
    config = json.loads((tmp_path / "mlp_mnist" / "config.json").read_text())
    assert (config["protocol"], config["folds"], config["subset"], config["epochs"]) == ("cpu", 3, 30, 1)
    comp = json.loads((tmp_path / "compartmental_mnist" / "config.json").read_text())
    P = PROTOCOLS["cpu"][("compartmental", "mnist")]
    assert comp["fixed"] == {"batch_size": P.batch_size, "l_f_phase_test": P.test_phase} and "held" in comp
    assert len(read(tmp_path / "compartmental_mnist")[0]["fold_scores"]) == 3
    run = subprocess.run([sys.executable, "-m", "utils.study", "--protocol", "gpu"], capture_output=True,
                         text=True, cwd=utils.study.Path(utils.study.__file__).parents[1], timeout=300)
    assert run.returncode == 2 and "invalid choice: 'gpu'" in run.stderr


# ----------------------------------------------------------------------------------------------------------------
# issue 30, item 4: the study figure


def test_the_study_figure_draws_from_a_small_log(tmp_path):
    from utils.plot_study import main as plot_main
    from utils.plot_study import plot_study
    from utils.study_log import load_results
    calls = []

    def sometimes_fails(hp):   # the third evaluation of each study fails: a cross at chance
        calls.append(1)
        if len(calls) % 4 == 3:
            raise MemoryError("no room")
        return three_folds(hp)

    for model, dataset in (("mlp", "mnist"), ("cnn", "mnist"), ("mlp", "fashion")):
        run_study(model, tiny_dataset(), out=tmp_path / "logs", name=dataset, iterations=4, init_points=2,
                  evaluate=sometimes_fails, retrain=False, verbose=0)
    evals = load_results(tmp_path / "logs")
    fig = plot_study(evals, reference={("mlp", "mnist"): 0.968, ("cnn", "mnist"): 0.99},
                     path=tmp_path / "study.png")
    axes = fig.axes
    assert len(axes) == 4 and [a.get_title() for a in axes[:2]] == ["mnist", "fashion"]
    assert all(a.get_ylim() == (0.0, 100.0) for a in axes)
    chance = [line for a in axes for line in a.get_lines() if line.get_label() == "chance"]
    assert len(chance) == 4 and all(list(line.get_ydata()) == [25.0, 25.0] for line in chance)  # 4 classes
    stars = [line for line in axes[0].get_lines() if line.get_marker() == "*"]
    assert sorted(float(line.get_ydata()[0]) for line in stars) == [96.8, 99.0]
    ticks = [t.get_text() for t in axes[2].get_xticklabels()]
    assert ticks == ["mlp\n(4 evaluations)", "cnn\n(4 evaluations)"]
    assert (tmp_path / "study.png").stat().st_size > 20_000
    plot_main([str(tmp_path / "logs"), "--path", str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").stat().st_size > 20_000


# ----------------------------------------------------------------------------------------------------------------
# issue 30: the committed study logs (results/study/, once the lead commits the protocol's runs)

COMMITTED = utils.study.Path(utils.study.__file__).resolve().parents[1] / "results" / "study"


def check_study_logs(folder):
    """Every study under `folder` parses with summarize; a finished row (best.json) has the evaluations its config
    asks for, each trained one 3 fold scores, and its provenance and wall time recorded."""
    table = summarize(folder)
    assert len(table), f"no study logs under {folder}"
    for row in table.itertuples():
        d = folder / f"{row.model}_{row.dataset}"
        config = json.loads((d / "config.json").read_text())
        assert config["folds"] == 3 and {"commit", "machine", "command"} <= set(config["provenance"])
        assert all(len(r["fold_scores"]) == 3 for r in read(d) if r["status"] == "ok")
        if (d / "best.json").exists():
            assert row.n_evals >= config["iterations"] and row.wall_s > 0 and row.test_acc == row.test_acc
    return table


@pytest.mark.skipif(not COMMITTED.is_dir(), reason="no committed study logs under results/study/ yet")
def test_committed_study_logs_parse_with_three_fold_scores():
    check_study_logs(COMMITTED)


def test_the_committed_logs_check_holds_on_a_small_protocol_study(tmp_path):
    for model in ("mlp", "mlp-fa"):
        run_study(model, tiny_dataset(), protocol_settings("cpu", model, "mnist", out=tmp_path, iterations=2,
                                                           init_points=1, name="mnist", verbose=0), epochs=1)
    assert list(check_study_logs(tmp_path).model) == ["mlp", "mlp-fa"]

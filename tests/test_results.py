"""utils.results: single trainings as pieces whose records carry their configuration and provenance, the figures
drawn from them, and the committed records themselves."""
import json

import pytest

from utils import results
from utils.train import synthetic_dataset


@pytest.fixture
def blobs():
    ds = synthetic_dataset(n_train=600, n_test=200)
    return ds


def test_a_piece_records_config_provenance_curves_and_test_accuracy(blobs, tmp_path):
    piece = results.Piece("blobs", "mlp-fa", dict(hidden_sizes=(16, 16), lr=3e-3, batch_size=50), epochs=2,
                          n_valid=100, records_per_epoch=3, max_valid=50)
    rec = results.run_piece(piece, blobs, root=tmp_path, log=lambda line: None)
    saved = json.loads((tmp_path / "single" / "blobs_mlp-fa.json").read_text())
    assert saved["finished"] and saved["test_accuracy"] == rec["test_accuracy"] > 0.2   # above chance (10 %)
    cfg = saved["config"]
    assert cfg["n_train"] == 500 and cfg["n_valid"] == 100 and cfg["n_test"] == 200 and cfg["epochs"] == 2
    assert cfg["hyperparameters"]["hidden_sizes"] == [16, 16] and cfg["model"] == "mlp-fa"
    prov = saved["provenance"]
    assert {"commit", "versions", "machine", "command", "started"} <= set(prov)
    assert len(saved["records"]) == 1 + 2 * 3 and saved["wall_s"] > 0
    assert [e["epoch"] for e in saved["training"]["epochs"]] == [1, 2]
    table = results.frame(saved)
    assert set(table["model"]) == {"mlp-fa"} and table["valid_acc"].dtype.kind == "f"
    assert table["bp_angle"].notna().any()   # the rule's angle to backprop, per hidden layer


def test_a_stopped_piece_is_started_not_done(blobs, tmp_path, monkeypatch):
    piece = results.Piece("blobs", "mlp", dict(hidden_sizes=(8,), lr=1e-3, batch_size=50), epochs=3, n_valid=100,
                          records_per_epoch=2, max_valid=50)
    monkeypatch.setitem(results.PIECES, piece.name, piece)

    def interrupt(line):
        if "epoch 2/3" in line:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        results.run_piece(piece, blobs, root=tmp_path, log=interrupt)
    assert results.status(piece.name, tmp_path) == "started"
    rec = results.load_record(piece.name, tmp_path)
    assert not rec["finished"] and len(rec["records"]) == 1 + 2   # the first record and epoch 1's two
    results.run_piece(piece, blobs, root=tmp_path, log=lambda line: None)
    assert results.status(piece.name, tmp_path) == "done"


def test_figures_draw_only_finished_pieces_and_list_them_in_the_manifest(blobs, tmp_path, monkeypatch):
    for model in ("mlp", "cnn"):
        hp = dict(hidden_sizes=(8,)) if model == "mlp" else dict(channels=(4,), kernel_sizes=(3,), padding=1)
        piece = results.Piece("mnist", model, dict(hp, lr=3e-3, batch_size=50), epochs=1, n_valid=100,
                              records_per_epoch=2, max_valid=50)
        monkeypatch.setitem(results.PIECES, piece.name, piece)
        results.run_piece(piece, blobs, root=tmp_path, log=lambda line: None)
    manifest = results.draw_figures(root=tmp_path, figures_dir=tmp_path / "fig", log=lambda line: None)
    curves = manifest["figures/results_learning_curves.png"]
    assert curves["files"] == ["single/mnist_mlp.json", "single/mnist_cnn.json"]
    assert "mnist/compartmental" in curves["missing"] and "figures/results_bp_angle.png" not in manifest
    assert (tmp_path / "fig" / "results_learning_curves.png").stat().st_size > 10_000


def test_every_committed_record_is_finished_or_says_where_it_stopped():
    for name, piece in results.PIECES.items():
        rec = results.load_record(name)
        if rec is None:
            continue
        assert rec["piece"] == name and rec["config"]["model"] == piece.model
        assert rec["provenance"]["commit"] and rec["provenance"]["command"].startswith("python -m utils.results")
        if rec["finished"]:
            assert len(rec["training"]["epochs"]) == piece.epochs == rec["config"]["epochs"]
            assert 0 < rec["test_accuracy"] <= 1 and rec["config"]["n_test"] == 10000
            assert len(rec["records"]) == 1 + piece.epochs * piece.records_per_epoch


def test_readme_figures_exist_and_the_manifest_names_existing_records():
    from pathlib import Path
    repo = Path(results.__file__).resolve().parents[1]
    manifest_path = results.RESULTS / "manifest.json"
    if not manifest_path.exists():
        pytest.skip("no results drawn yet")
    manifest = json.loads(manifest_path.read_text())
    readme = (repo / "README.md").read_text()
    shown = {line.split("](")[1].split(")")[0] for line in readme.splitlines() if "](figures/" in line}
    for fig in shown:
        assert (repo / fig).exists(), fig
        if Path(fig).name.startswith("results_") or Path(fig).name.startswith("study_"):
            assert fig in manifest, f"{fig} is not in results/manifest.json"
    for fig, entry in manifest.items():
        assert (repo / fig).exists(), fig
        assert all((results.RESULTS / f).exists() for f in entry["files"]), entry


def test_study_table_and_figure_from_study_rows_under_results(tmp_path):
    from test_study import tiny_dataset
    from utils.study import protocol_settings, run_study
    assert results.study_table(tmp_path).count("\n") == 1   # no rows yet: the header only
    run_study("mlp", tiny_dataset(), protocol_settings("cpu", "mlp", "mnist", out=tmp_path / "study", iterations=2,
                                                       init_points=1, name="mnist", verbose=0), epochs=1)
    rows = results.study_table(tmp_path).splitlines()[2:]
    assert len(rows) == 1 and rows[0].startswith("| mlp | mnist | 2 of 2 | 30,000 x 1 | **") and "| 96.8 |" in rows[0]
    manifest = results.draw_figures(root=tmp_path, figures_dir=tmp_path / "fig", log=lambda line: None)
    assert manifest["figures/results_study.png"]["files"] == ["study/mlp_mnist/evals.jsonl"]
    assert (tmp_path / "fig" / "results_study.png").stat().st_size > 10_000


def test_rule_pieces_take_the_settings_the_rules_benchmark_measured():
    """Each MLP rule piece trains at the learning rate and with the rule settings that benchmarks/bench_training.py
    found for its dataset (RULE_LR, RULE_SETTINGS; backprop's rate where it names none), so that a piece does not
    run a rule at settings the benchmark showed to fail (SDTP on CIFAR-10 at backprop's rate: 27 %)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"
    spec = importlib.util.spec_from_file_location("bench_training", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    checked = 0
    for piece in results.PIECES.values():
        network, _, rule = piece.model.partition("-")
        if network != "mlp" or not rule or (network, piece.dataset) not in bench.RULE_LR | bench.RULE_SETTINGS:
            continue
        hp = piece.hyperparameters
        lr = bench.RULE_LR.get((network, piece.dataset), {}).get(rule)
        assert hp["lr"] == (lr if lr is not None else results.PIECES[f"{piece.dataset}/mlp"].hyperparameters["lr"]), \
            piece.name
        for setting, value in bench.RULE_SETTINGS.get((network, piece.dataset), {}).get(rule, {}).items():
            assert hp.get(setting) == value, (piece.name, setting)
        checked += 1
    assert checked >= 12

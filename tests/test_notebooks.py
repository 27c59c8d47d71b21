"""Both notebooks, top to bottom, in quick mode on the real datasets under $BIODL_DATA (skipped when it lacks them).

Each runs in a temporary working directory (its runs/, runs/figures/ and logs/ land there, not in the repository)
with the repository on PYTHONPATH and MPLBACKEND=Agg as CI sets it; any cell error fails the test, and so do a
plotting cell without its figure in the notebook, a change to the committed figures/, or a logged run whose
logger validates more than VALID_SHARE of the examples it trains on. (That count, not the LoggerOverheadWarning,
which compares times, judges the logger's cost here: whether the warning fires at these sizes depends on the
machine's load, and no test may depend on its speed.)
"""
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from utils.data import data_root

REPO = Path(__file__).resolve().parents[1]
NEEDS = {"workspace_mnist.ipynb": ["MNIST/raw", "FashionMNIST/raw"],
         "workspace_cifar.ipynb": ["cifar-10-batches-py"]}
VALID_SHARE = 0.25  # a logged run validates (records x validation examples) at most this share of its training examples


def execute_notebook(notebook, tmp_path, monkeypatch, quick):
    """Run `notebook` top to bottom in tmp_path (the repository on PYTHONPATH, MPLBACKEND=Agg as CI sets it,
    WORKSPACE_QUICK=`quick`, unset for None) and return it with its outputs; skipped without the real datasets.
    The executed copy stays in tmp_path for a look after a failure."""
    root = os.environ.get("BIODL_DATA")
    if not root or not all((data_root(root) / sub).is_dir() for sub in NEEDS[notebook]):
        pytest.skip(f"BIODL_DATA does not hold {', '.join(NEEDS[notebook])}: the notebooks need the real datasets")
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(REPO / notebook, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "committed notebooks carry no outputs"
    if quick is None:
        monkeypatch.delenv("WORKSPACE_QUICK", raising=False)
    else:
        monkeypatch.setenv("WORKSPACE_QUICK", quick)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as .ci/run sets it: the notebook must still show its figures
    monkeypatch.delenv("BIODL_FIGURES", raising=False)  # the notebook's own choice: runs/figures/
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / notebook)
    return nb


@pytest.mark.parametrize("notebook", sorted(NEEDS))
def test_notebook_runs_in_quick_mode(notebook, tmp_path, monkeypatch):
    committed = {p.name: p.stat().st_mtime_ns for p in (REPO / "figures").glob("*.png")}
    nb = execute_notebook(notebook, tmp_path, monkeypatch, "tiny")  # quick mode's steps at TINY's sizes
    folder = tmp_path / "runs" / "figures"
    figures = sorted(p.name for p in folder.glob("*.png"))
    assert len(figures) >= 6 and all((folder / f).stat().st_size > 10_000 for f in figures), figures
    assert {p.name: p.stat().st_mtime_ns for p in (REPO / "figures").glob("*.png")} == committed
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        if "plot_" in cell.source and "import" not in cell.source:
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"no figure shown: {cell.source}"
    assert_logger_validates_little(tmp_path)


def assert_logger_validates_little(folder):
    """Every logged run saved under `folder` (config.json with the logger's settings, records.csv) validated at most
    VALID_SHARE of the examples it trained on: the logger's cost by count, whatever the machine's speed."""
    for config_path in folder.rglob("config.json"):
        logger = json.loads(config_path.read_text()).get("logger")
        if not logger or not (config_path.parent / "records.csv").exists():
            continue
        trained = pd.read_csv(config_path.parent / "records.csv").examples_seen.max()
        validated = logger["n_records"] * (logger["n_valid"] or 0)
        assert validated <= VALID_SHARE * trained, (config_path.parent, logger, trained)


def test_notebooks_are_one_template_that_loads_each_dataset_once():
    """Both notebooks run the same code cells (only DATASETS differs): one cell loads the datasets, every later
    step is handed them (tests/test_workspace.py: the steps load nothing again)."""
    import nbformat

    def code(notebook):
        nb = nbformat.read(REPO / notebook, as_version=4)
        return [c.source for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]
    mnist, cifar = code("workspace_mnist.ipynb"), code("workspace_cifar.ipynb")
    assert mnist == cifar
    assert sum(src.count("load_dataset(") for src in mnist) == 1


def test_the_logger_cost_check_counts_examples_not_seconds(tmp_path):
    from utils.logger import TrainingLogger
    import torch
    X, y = torch.rand(20, 4), torch.arange(20) % 2
    for name, n_train, max_valid in (("light", 400, 10), ("heavy", 40, 10)):
        log = TrainingLogger(X, y, records_per_epoch=2, max_valid=max_valid, name=name)
        log.examples_seen_ = 0
        log.records_ = [{"record": i, "epoch": 0, "examples_seen": n_train * i // 2, "wall_time": 0.0,
                         "train_time": 0.0, "logger_time": 0.0, "train_loss": 1.0, "train_acc": 0.5,
                         "valid_loss": 1.0, "valid_acc": 0.5, "layers": {}, "bp_angle": {}} for i in range(3)]
        log.save(tmp_path / name)
    assert_logger_validates_little(tmp_path / "light")   # 3 records x 10 <= 0.25 x 400
    with pytest.raises(AssertionError):
        assert_logger_validates_little(tmp_path / "heavy")   # 3 x 10 > 0.25 x 40

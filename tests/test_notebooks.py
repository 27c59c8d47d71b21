"""Both notebooks, top to bottom, in quick mode on the real datasets under $BIODL_DATA (skipped when it lacks them).

Each runs in a temporary working directory (its runs/, runs/figures/ and logs/ land there, not in the repository)
with the repository on PYTHONPATH and MPLBACKEND=Agg as CI sets it; any cell error fails the test, and so do a
plotting cell without its figure in the notebook, a LoggerOverheadWarning, or a change to the committed figures/.
"""
import os
from pathlib import Path

import pytest

from utils.data import data_root

REPO = Path(__file__).resolve().parents[1]
NEEDS = {"workspace_mnist.ipynb": ["MNIST/raw", "FashionMNIST/raw"],
         "workspace_cifar.ipynb": ["cifar-10-batches-py"]}


@pytest.mark.parametrize("notebook", sorted(NEEDS))
def test_notebook_runs_in_quick_mode(notebook, tmp_path, monkeypatch):
    root = os.environ.get("BIODL_DATA")
    if not root or not all((data_root(root) / sub).is_dir() for sub in NEEDS[notebook]):
        pytest.skip(f"BIODL_DATA does not hold {', '.join(NEEDS[notebook])}: the notebooks need the real datasets")
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(REPO / notebook, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "committed notebooks carry no outputs"
    monkeypatch.setenv("WORKSPACE_QUICK", "tiny")  # quick mode's steps at the smallest sizes (utils.workspace.TINY)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as .ci/run sets it: the notebook must still show its figures
    monkeypatch.delenv("BIODL_FIGURES", raising=False)  # quick mode's own choice: runs/figures/
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    committed = {p.name: p.stat().st_mtime_ns for p in (REPO / "figures").glob("*.png")}
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:  # the executed copy (outputs, per-cell timing) stays in tmp_path for a look after a failure
        nbformat.write(nb, tmp_path / notebook)
    folder = tmp_path / "runs" / "figures"
    figures = sorted(p.name for p in folder.glob("*.png"))
    assert len(figures) >= 6 and all((folder / f).stat().st_size > 10_000 for f in figures), figures
    assert {p.name: p.stat().st_mtime_ns for p in (REPO / "figures").glob("*.png")} == committed
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        if "plot_" in cell.source and "import" not in cell.source:
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"no figure shown: {cell.source}"
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "LoggerOverheadWarning" not in text, text


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

"""Both notebooks, top to bottom, in quick mode on the real datasets under $BIODL_DATA (skipped when it lacks them).

Each runs in a temporary working directory (its figures, runs/ and logs/ land there, not in the repository) with
the repository on PYTHONPATH; any cell error fails the test.
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
    monkeypatch.setenv("WORKSPACE_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("BIODL_FIGURES", str(tmp_path / "figures"))  # not the repository's figures/
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    client = NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:  # the executed copy (outputs, per-cell timing) stays in tmp_path for a look after a failure
        nbformat.write(nb, tmp_path / notebook)
    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert len(figures) >= 6 and all((tmp_path / "figures" / f).stat().st_size > 10_000 for f in figures), figures

"""The notebooks' default run: every figure and table drawn from the committed results (results/), nothing trained.

Runs each notebook top to bottom with WORKSPACE_QUICK unset and RERUN = None, in a temporary working directory, on the
real datasets under $BIODL_DATA (skipped without them: the data cell loads them for the sample figures). It must
train nothing (no run folder, no study log written), say for each figure which records it draws, and leave the
committed results and figures untouched.
"""
import os
from pathlib import Path

import pytest

from utils import results
from utils.data import data_root

REPO = Path(__file__).resolve().parents[1]
NEEDS = {"workspace_mnist.ipynb": ["MNIST/raw", "FashionMNIST/raw"],
         "workspace_cifar.ipynb": ["cifar-10-batches-py"]}


@pytest.mark.parametrize("notebook", sorted(NEEDS))
def test_notebook_draws_the_committed_results_without_training(notebook, tmp_path, monkeypatch):
    root = os.environ.get("BIODL_DATA")
    if not root or not all((data_root(root) / sub).is_dir() for sub in NEEDS[notebook]):
        pytest.skip(f"BIODL_DATA does not hold {', '.join(NEEDS[notebook])}: the notebooks need the real datasets")
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(REPO / notebook, as_version=4)
    monkeypatch.delenv("WORKSPACE_QUICK", raising=False)
    monkeypatch.delenv("BIODL_FIGURES", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    committed = {p: p.stat().st_mtime_ns for p in [*(REPO / "figures").glob("*.png"), *results.RESULTS.rglob("*")]}
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / notebook)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.startswith("runs/figures/") or p == notebook for p in written), written   # nothing trained
    assert {p: p.stat().st_mtime_ns for p in committed} == committed
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    datasets = ["mnist", "fashion"] if "mnist" in notebook else ["cifar10"]
    done = [n for n in results.PIECES if n.split("/")[0] in datasets and results.status(n) == "done"]
    for name in done:   # every finished piece of these datasets is drawn and named
        assert f"results/single/{name.replace('/', '_')}.json" in text, name
    if done:
        assert "drawn from: results/single/" in text

"""The notebooks' default run: every figure and table drawn from the committed results (results/), nothing trained.

Runs each notebook top to bottom with WORKSPACE_QUICK unset and RERUN = None, in a temporary working directory, on the
real datasets under $BIODL_DATA (skipped without them: the data cell loads them for the sample figures). It must
train nothing (no run folder, no study log written), say for each figure which records it draws, and leave the
committed results and figures untouched.
"""
import pytest

from test_notebooks import NEEDS, REPO, execute_notebook
from utils import results


@pytest.mark.parametrize("notebook", sorted(NEEDS))
def test_notebook_draws_the_committed_results_without_training(notebook, tmp_path, monkeypatch):
    committed = {p: p.stat().st_mtime_ns for p in [*(REPO / "figures").glob("*.png"), *results.RESULTS.rglob("*")]}
    nb = execute_notebook(notebook, tmp_path, monkeypatch, None)
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

"""README's set-up: two commands that work on a fresh clone (one installs and runs the main command, one runs the
tests, the command .ci/run runs), the CPU-only torch line as an explained option; requirements keep the torch."""
import re
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _section(title):
    text = (REPO / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_setup_is_two_commands_install_and_main_command_then_the_tests():
    setup = _section("Set-up and main command")
    block = setup.split("```bash\n", 1)[1].split("```", 1)[0]
    first, second = block.strip().splitlines()
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && ")
    assert "BIODL_DATA=" in first and "WORKSPACE_QUICK=1 jupyter nbconvert" in first
    assert first.rstrip().endswith("workspace_mnist.ipynb")
    ci = (REPO / ".ci" / "run").read_text()
    assert second == "python -m pytest -q" and re.search(r"^python -m pytest -q$", ci, re.M)
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in " ".join(setup.split())
    assert ".venv/" in (REPO / ".gitignore").read_text().splitlines()


def test_requirements_keep_the_installed_torch():
    lines = [ln.split("#", 1)[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    assert not any(ln.startswith("-") for ln in lines), "no index options: they would force a torch build"
    reqs = {r.name: r for r in (Requirement(ln) for ln in lines if ln)}
    for name in ("torch", "torchvision"):
        installed = Version(version(name).split("+")[0])
        assert reqs[name].specifier.contains(installed, prereleases=True), (name, installed, reqs[name])
        assert not re.search(r"cu\d+", str(reqs[name]))


def test_readme_is_short_and_its_tables_carry_no_placeholders():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "RESULTS_" not in text and "TBD" not in text

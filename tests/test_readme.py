"""README's set-up and requirements.txt: a first run on a CPU-only machine gets a venv and the CPU build of torch."""
import re
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _section(title):
    text = (REPO / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_setup_makes_a_venv_and_installs_the_cpu_torch_before_the_requirements():
    setup = _section("Set-up and main command")
    venv = setup.index("python3 -m venv .venv && source .venv/bin/activate")
    cpu = setup.index("pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu")
    assert venv < cpu < setup.index("pip install -r requirements.txt")


def test_requirements_keep_the_installed_torch():
    lines = [ln.split("#", 1)[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    assert not any(ln.startswith("-") for ln in lines), "no index options: they would force a torch build"
    reqs = {r.name: r for r in (Requirement(ln) for ln in lines if ln)}
    for name in ("torch", "torchvision"):
        installed = Version(version(name).split("+")[0])
        assert reqs[name].specifier.contains(installed, prereleases=True), (name, installed, reqs[name])
        assert not re.search(r"cu\d+", str(reqs[name]))


def test_notebook_times_say_where_and_under_what_load():
    intro = (REPO / "README.md").read_text().split("## Set-up and main command", 1)[0]
    assert re.search(r"quick mode .*2-core CPU.*load average", " ".join(intro.split()))

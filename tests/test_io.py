import json
import math

import numpy as np
import pytest
import torch

from utils import io


def test_json_is_strict_and_round_trips(tmp_path):
    obj = {"a": (1, 2), "nan": float("nan"), "inf": np.float32("inf"), "n": np.int64(3), "t": torch.tensor([1.5]),
           "kind": float, "flag": np.bool_(True)}
    io.write_json(tmp_path / "x.json", obj)
    text = (tmp_path / "x.json").read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert back == {"a": [1, 2], "nan": "nan", "inf": "inf", "n": 3, "t": [1.5], "kind": "float", "flag": True}
    assert not list(tmp_path.glob("*.tmp"))


def test_jsonl_append_and_replace(tmp_path):
    path = tmp_path / "log.jsonl"
    io.append_jsonl(path, {"i": 0}, {"i": 1})
    io.append_jsonl(path, {"i": 2, "v": -math.inf})
    assert [json.loads(l) for l in path.read_text().splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2, "v": "-inf"}]
    io.write_jsonl(path, [{"i": 9}])
    assert path.read_text() == '{"i": 9}\n'


def test_save_torch_weights_only(tmp_path):
    io.save_torch({"w": torch.arange(3.0)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3.0))


def test_library_versions_names_torch_and_device():
    v = io.library_versions("cpu")
    assert v["torch"].startswith(torch.__version__.split("+")[0]) and v["device"] == "cpu"


def test_provenance_names_commit_machine_and_command():
    from utils.io import provenance
    p = provenance(["-m", "utils.results", "--piece", "mlp:mnist"])
    assert p["command"] == "python -m utils.results --piece mlp:mnist"
    assert p["commit"] is None or len(p["commit"]) == 40
    assert p["machine"]["cores"] >= 1 and p["versions"]["torch"]
    json.dumps(p, allow_nan=False)

"""The training core: one loop every workflow trains through, one build path, one key=value
coercer, an import graph without cycles or upward imports."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import repnet
from repnet import RepnetError, loop
from repnet.keyvalue import coerce_value, parse_pairs

SRC = Path(repnet.__file__).parent
QUICK = dict(dataset="digits", backbone="proxylessnas_mobile", random_init=True, memory="vanilla", image_size=32,
             epochs=1, steps_per_epoch=2, workers=0, progress=False, profile_memory=False)


@pytest.fixture
def fit_calls(monkeypatch):
    """Counts calls of the one training loop (and still trains)."""
    calls = []
    real = loop.fit

    def counting(*a, **k):
        calls.append(k.get("name", ""))
        return real(*a, **k)

    monkeypatch.setattr(loop, "fit", counting)
    return calls


def test_train_continual_federated_demo_reproduce_all_train_through_fit(tmp_path, fit_calls):
    from repnet.config import make_config
    from repnet.continual import train_sequence
    from repnet.demo import DemoConfig, compare
    from repnet.fedcore import LocalClient, Settings, encode_state
    from repnet.reproduce import Run, run_one
    from repnet.training import train

    train(make_config({**QUICK, "method": "last", "out_dir": str(tmp_path / "t")}))
    assert len(fit_calls) == 1
    train_sequence(["a=digits", "b=digits"], backbone="proxylessnas_mobile", method="last", out_dir=tmp_path / "c",
                   **{k: v for k, v in QUICK.items() if k not in ("dataset", "backbone", "profile_memory")})
    assert fit_calls[1:] == ["task 'a'", "task 'b'"]
    ov = {k: v for k, v in QUICK.items() if k != "profile_memory"}
    # a Flower client's local round (the ClientApp's work; it runs in a Ray actor in the simulation)
    client = LocalClient(Settings({**ov, "method": "last", "train_subset": 64}, clients=2), 1, 2)
    client.train(encode_state(client.model, client.model.trainable_state_dict()), server_round=1)
    assert fit_calls[3:] == ["client 1"]
    compare(DemoConfig(out_dir=str(tmp_path / "d"), methods=("last",), backbone="proxylessnas_mobile",
                       dataset="digits", image_size=32, train_subset=64, test_subset=32, epochs=1, batch_size=8,
                       random_init=True, progress=False, profile_memory=False, steps_per_epoch=2))
    assert len(fit_calls) == 5
    status, _ = run_one(Run("x", {**QUICK, "method": "last", "out_dir": str(tmp_path / "r")}, []))
    assert status == "trained" and len(fit_calls) == 6


def _calls_of(name: str) -> dict[str, int]:
    out = {}
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        n = sum(1 for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == name)
        if n:
            out[str(path.relative_to(SRC))] = n
    return out


def test_one_place_turns_on_int8_and_one_place_runs_training_steps():
    assert _calls_of("enable_int8_training") == {"api.py": 1}
    # the workflows call the one loop; Hyb-Learn's self-supervised warm-up too (another objective, same loop)
    assert _calls_of("fit") == {"training.py": 1, "continual.py": 1, "fedcore.py": 1, "hyblearn.py": 1}


def test_construction_options_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = repnet.get_model("proxylessnas_mobile", "repnet", 4, image_size=32, pretrained=False,
                             int8={"rounding": "nearest", "master": "int8"})
    cfg = model.config()
    assert cfg["memory"] == "engine" and cfg["int8"]["rounding"] == "nearest" and cfg["int8"]["master"] == "int8"
    model.save_pretrained(str(tmp_path / "a"))
    torch.manual_seed(0)
    loaded = repnet.from_pretrained(str(tmp_path / "a"))
    assert loaded.config() == cfg
    x = torch.randn(2, 3, 32, 32)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    torch.manual_seed(1)
    plain = repnet.get_model("proxylessnas_mobile", "last", 4, image_size=32, pretrained=False, memory="vanilla",
                             frozen_bits="linear")
    plain.save_pretrained(str(tmp_path / "b"))
    torch.manual_seed(1)
    back = repnet.from_pretrained(str(tmp_path / "b"))
    assert back.config()["memory"] == "vanilla" and back.config()["frozen_bits"] == "linear"


def test_get_model_builds_on_a_shared_backbone_object():
    bb = repnet.create_backbone("proxylessnas_mobile", pretrained=False)
    a = repnet.get_model(bb, "repnet", 3, image_size=32, train_bias=False)
    b = repnet.get_model(bb, "last", 5, image_size=32)
    assert a.backbone is b.backbone is bb


@pytest.mark.parametrize("value,typ,expected", [
    ("1", "bool", True), ("off", "bool", False), (True, "bool", True), ("8", "int", 8), ("8.0", "int", 8),
    ("3e-4", "float", 3e-4), ("none", "int | None", None), ("", "str | None", None), ("x", "str", "x"),
    ("{a: 1}", "dict", {"a": 1}),
])
def test_one_coercer_for_every_key_value(value, typ, expected):
    assert coerce_value(value, typ, "k") == expected


@pytest.mark.parametrize("value,typ", [("maybe", "bool"), ("8.5", "int"), ("true", "int"), (True, "int"),
                                       ("x", "float"), ("[1]", "dict"), (None, "int")])
def test_one_coercer_refuses_in_one_line(value, typ):
    with pytest.raises(RepnetError) as e:
        coerce_value(value, typ, "k")
    assert "\n" not in str(e.value)


def test_set_and_opt_accept_the_same_spellings():
    from repnet.config import make_config

    assert make_config({"int8": "1"}).int8 is True and make_config({"int8": "yes"}).int8 is True
    model = repnet.get_model("proxylessnas_mobile", "repnet", 3, image_size=32, pretrained=False, train_bias="1")
    assert model.options.train_bias is True
    assert parse_pairs(["a=1", " b = x=y "], "--set") == {"a": "1", "b": "x=y"}


def test_import_graph_has_no_cycle_and_no_upward_import():
    root = SRC.parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "check_imports.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "0 cycles; 0 upward imports" in r.stdout


def test_help_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import sys; from repnet.cli import build_parser; build_parser(); "
                        "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr[-2000:]

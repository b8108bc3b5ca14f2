"""The training core: one loop every workflow trains through, one build path, one key=value
coercer, an import graph without cycles or upward imports."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import repnet
from repnet.training import loop
from tests.helpers import TINY

SRC = Path(repnet.__file__).parent
QUICK = {**TINY, "memory": "vanilla", "epochs": 1, "steps_per_epoch": 2}


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
    from repnet.config.recipes import make_config
    from repnet.continual.sequence import train_sequence
    from repnet.demo.config import DemoConfig
    from repnet.demo.run import compare
    from repnet.federated.core import LocalClient, Settings, encode_state
    from repnet.reproduce.runner import Run, run_one
    from repnet.training.run import train

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


def _calls_of(name: str, owner: str | None = None) -> dict[str, int]:
    """Calls of ``name`` per source file; with ``owner``, only ``owner.name(...)`` (``loop.fit``, not an embedder's ``fit``)."""
    out = {}
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        n = sum(1 for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == name
                and (owner is None or getattr(getattr(node.func, "value", None), "id", None) == owner))
        if n:
            out[str(path.relative_to(SRC))] = n
    return out


def test_one_place_turns_on_int8_and_one_place_runs_training_steps():
    assert _calls_of("enable_int8_training") == {"api.py": 1}
    # the workflows call the one loop; Hyb-Learn's self-supervised warm-up too (another objective, same loop)
    # (ProvIoT's autoencoder too: the same loop with an MSE objective)
    assert _calls_of("fit", owner="loop") == {"training/run.py": 1, "training/tune.py": 1, "continual/sequence.py": 1,
                                              "federated/core.py": 1, "continual/methods/hyblearn.py": 1,
                                              "proviot/detector.py": 1}
    # nothing imports the loop's fit under another name
    assert not re.search(r"from repnet\.training\.loop import[^\n]*\bfit\b",
                         "\n".join(p.read_text() for p in SRC.rglob("*.py")))


def test_import_graph_has_no_cycle_and_no_upward_import():
    root = SRC.parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "check_imports.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "0 cycles; 0 upward imports" in r.stdout


def test_help_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import sys; from repnet.cli import build_parser; build_parser(); "
                        "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr[-2000:]

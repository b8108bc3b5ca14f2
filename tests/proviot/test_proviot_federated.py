"""The federated run goes through Flower (simulation runtime: ServerApp, 3 ClientApps) and only
the autoencoder's tensors travel: every reply holds one ArrayRecord with exactly the model's
keys and one MetricRecord of counts; the bytes counted are those of the serialised arrays; the
averaged model is FedAvg of what the devices sent."""
import shutil

import pytest
import torch

pytest.importorskip("flwr")
pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from repnet.proviot.collect import save_trace
    from repnet.proviot.workloads import DEVICES, plan_session, run_session

    base = tmp_path_factory.mktemp("fleet")
    for k, dev in enumerate(DEVICES):
        (base / f"device-{k}").mkdir()
        save_trace(run_session(plan_session(dev, 16, seed=k), dev, seed=k), base / f"device-{k}" / "benign.json")
    return base


def test_flower_simulation_only_model_tensors_travel(fleet, tmp_path):
    from repnet.proviot import federated as F
    from repnet.proviot.detector import DetectorSettings, autoencoder

    s = DetectorSettings(epochs=2, seed=0)
    fs = F.FleetSettings(fleet=str(fleet), clients=3, rounds=2, local_epochs=2, settings=s, out=str(tmp_path / "out"))
    res = F.simulate(fs, cpus=2)
    assert res["framework"] == "flower" and [h["round"] for h in res["history"]] == [1, 2]
    keys = sorted(autoencoder(50).state_dict())
    model_bytes = sum(v.numel() * 4 for v in autoencoder(50).state_dict().values())
    assert res["model_bytes"] == model_bytes == 12848
    for h in res["history"]:
        assert h["devices"] == [0, 1, 2]
        for rec in h["reply_records"].values():
            assert rec["array_records"] == ["arrays"] and rec["metric_records"] == ["metrics"]
            assert rec["config_records"] == [] and rec["array_keys"] == keys
            assert set(rec["metric_keys"]) <= {"num-examples", "partition-id", "train-loss", "train-time-s"}
        assert set(h["tensor_bytes_received"].values()) == {model_bytes}
        # serialised arrays: the tensor bytes plus each array's small header, nothing else
        for b in h["bytes_received"].values():
            assert model_bytes < b < model_bytes + 200 * len(keys)
        assert h["bytes_sent_per_device"] == max(h["bytes_received"].values())
    # the global model moved away from the initial one, and devices can detect with it
    init = F.FleetServer(fs).initial
    assert any(not torch.equal(init[k], res["global_state"][k]) for k in keys)
    det = F.device_detector(F.DeviceData(F.benign_windows(fleet / "device-0"), s), res["global_state"])
    assert det.window_threshold > 0
    assert (tmp_path / "out" / "federated.json").is_file()
    # FedAvg by hand: each device's local round is a pure function of (global weights, its data,
    # seed, round, device), so the weighted mean of the three updates, twice, is the server's model
    from flwr.app import ArrayRecord

    from repnet.federated.core import decode_arrays

    state = init
    for r in (1, 2):
        outs = [F.client_train(fs, k, ArrayRecord({n: v.clone() for n, v in state.items()}), r) for k in range(3)]
        w = [m["num-examples"] for _, m in outs]
        states = [decode_arrays(a) for a, _ in outs]
        state = {n: sum(st[n] * x for st, x in zip(states, w)) / sum(w) for n in init}
    for n in keys:
        assert torch.allclose(res["global_state"][n], state[n], atol=1e-5)


def test_missing_device_folder_is_one_line(tmp_path):
    from repnet import RepnetError
    from repnet.proviot import federated as F

    with pytest.raises(RepnetError, match="device-0: no trace files"):
        F.simulate(F.FleetSettings(fleet=str(tmp_path), clients=3))


def test_deployment_superlink_and_supernodes(fleet, tmp_path, monkeypatch):
    """The same apps deployed for real: a SuperLink and 3 SuperNodes on 127.0.0.1 (the fleet of
    tests/test_flower_deploy.py), `flwr run` of the app folder; the ServerApp writes the results."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.federated.fleet import Fleet, tagged, wait_or_kill

    from repnet.proviot import federated as F
    from repnet.proviot.detector import DetectorSettings

    import os

    # the fleet's processes import this repnet, wherever the test session found it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(str(Path(p).resolve()) for p in sys.path if p))
    fs = F.FleetSettings(fleet=str(fleet), clients=3, rounds=1, local_epochs=1, settings=DetectorSettings(epochs=1),
                         out=str(tmp_path / "run"))
    app = F.write_fleet_app(tmp_path / "app", fs).parent
    f = Fleet(tmp_path, 3)
    try:
        proc = f.run(app, stdout=open(tmp_path / "flwr-run.log", "w"), stderr=subprocess.STDOUT)
        wait_or_kill(proc, 600)
        log = (tmp_path / "flwr-run.log").read_text()
        assert proc.returncode == 0, log[-3000:]
        res = json.loads((tmp_path / "run" / "federated.json").read_text())
        assert res["framework"] == "flower" and res["history"][0]["devices"] == [0, 1, 2]
        assert set(res["history"][0]["tensor_bytes_received"].values()) == {res["model_bytes"]}
        assert (tmp_path / "run" / "global_autoencoder.safetensors").is_file()
    finally:
        f.close()
    import time

    deadline = time.time() + 10  # (a process killed a moment ago may still be on its way out)
    while tagged(f.tag) and time.time() < deadline:
        time.sleep(0.3)
    assert tagged(f.tag) == [], "processes left behind"

"""Deployment mode, for real: a SuperLink and SuperNodes as separate processes on 127.0.0.1
(insecure mode), repnet's Flower app run against them with ``flwr run``, every process shut down
afterwards (also when the test fails); and a client process killed mid-round while the round
completes with the others."""
import json
import subprocess
import time

import pytest

from repnet.federated.run import write_app
from tests.federated.fleet import wait_or_kill
from tests.helpers import TINY

APP = {**TINY, "memory": "vanilla", "batch_size": 16, "train_subset": 192, "test_subset": 64, "progress": True}


def test_flwr_run_against_a_superlink_and_two_supernodes(tmp_path, fleet):
    f = fleet(2)
    app = write_app(str(tmp_path / "app"), APP, clients=2, rounds=2, out_dir=str(tmp_path / "run")).parent
    proc = f.run(app, stdout=open(tmp_path / "flwr-run.log", "w"), stderr=subprocess.STDOUT)
    wait_or_kill(proc, 600)
    log = (tmp_path / "flwr-run.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["framework"] == "flower" and [h["round"] for h in res["history"]] == [0, 1, 2]
    assert all(h["clients"] == [0, 1] and h["failures"] == [] for h in res["history"][1:])
    assert set(res["history"][-1]["tensor_bytes_received"].values()) == {res["adapter_bytes"]}
    assert res["frozen_backbone_tensors_changed"] == []
    from safetensors.torch import load_file

    from repnet.federated.run import state_bytes

    assert state_bytes(load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))) == res["adapter_bytes"]


def test_a_client_killed_mid_round_leaves_the_round_to_the_others(tmp_path, fleet):
    f = fleet(3)
    app = write_app(str(tmp_path / "app"), APP, clients=3, rounds=2, min_clients=2, out_dir=str(tmp_path / "run")).parent
    proc = f.run(app, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:  # the server has sent round 1's messages: pull the plug on node 2
        lines.append(line)
        if "configure_train" in line:
            time.sleep(1.0)
            f.kill("node2")
            break
    else:
        pytest.fail("".join(lines)[-3000:])
    lines += proc.stdout.readlines()
    wait_or_kill(proc, 600)
    log = "".join(lines)
    assert proc.returncode == 0, log[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    r1 = res["history"][1]
    assert r1["clients"] == [0, 1] and len(r1["failures"]) == 1, r1  # the round went on without node 2
    assert "heartbeat" in r1["failures"][0]["reason"]  # the SuperLink noticed the node was gone
    assert res["history"][2]["clients"] == [0, 1]
    assert res["test_accuracy"] == res["history"][2]["test_accuracy"]

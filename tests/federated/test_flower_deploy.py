"""Deployment mode, for real: a SuperLink and SuperNodes as separate processes on 127.0.0.1
(insecure mode), repnet's Flower app run against them with ``flwr run``, every process shut down
afterwards (also when the test fails); and a client process killed mid-round while the round
completes with the others."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from repnet.federated.run import write_app
from tests.helpers import TINY

BIN = Path(sys.executable).parent
APP = {**TINY, "memory": "vanilla", "batch_size": 16, "train_subset": 192, "test_subset": 64, "progress": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tagged(tag: str) -> list[int]:
    """Processes whose environment carries ``tag`` (everything a fleet started, children included)."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if tag.encode() in env.read_bytes():
                found.append(int(env.parent.name))
        except OSError:
            continue
    return [p for p in found if p != os.getpid()]


class Fleet:
    """A SuperLink and N SuperNodes on 127.0.0.1, each in its own process group."""

    def __init__(self, tmp: Path, nodes: int):
        self.tmp, self.tag = tmp, f"REPNET_FLEET_TEST={uuid.uuid4().hex}"
        self.port = _free_port()
        home = tmp / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        key, value = self.tag.split("=")
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", key: value,
                    "REPNET_CLIENT_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it starts flower-superexec
        self.procs: dict[str, subprocess.Popen] = {}
        self._start("superlink", [BIN / "flower-superlink", "--insecure", "--port", str(self.port)])
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"SuperLink did not start: {self.log('superlink')[-2000:]}")
                time.sleep(0.3)
        for k in range(nodes):
            self._start(f"node{k}", [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                     "--port", str(_free_port()),
                                     "--node-config", f"partition-id={k} num-partitions={nodes}"])

    def _start(self, name, args):
        log = open(self.tmp / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen([str(a) for a in args], env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, cwd=self.tmp)

    def log(self, name) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def kill(self, name):
        """SIGKILL a process and its children (a device losing power)."""
        p = self.procs[name]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def run(self, app: Path, timeout: float = 600, **popen):
        return subprocess.Popen([str(BIN / "flwr"), "run", str(app), "local", "--stream"], env=self.env,
                                cwd=self.tmp, start_new_session=True, text=True, **popen)

    def close(self):
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for pid in _tagged(self.tag):  # anything left (or that left the process groups): killed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def fleet(tmp_path):
    made = []

    def make(nodes):
        made.append(Fleet(tmp_path, nodes))
        return made[-1]

    yield make
    for f in made:
        f.close()
        time.sleep(0.5)
        assert _tagged(f.tag) == [], "processes left behind"


def _wait(proc, timeout):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def test_flwr_run_against_a_superlink_and_two_supernodes(tmp_path, fleet):
    f = fleet(2)
    app = write_app(str(tmp_path / "app"), APP, clients=2, rounds=2, out_dir=str(tmp_path / "run")).parent
    proc = f.run(app, stdout=open(tmp_path / "flwr-run.log", "w"), stderr=subprocess.STDOUT)
    _wait(proc, 600)
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
    _wait(proc, 600)
    log = "".join(lines)
    assert proc.returncode == 0, log[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    r1 = res["history"][1]
    assert r1["clients"] == [0, 1] and len(r1["failures"]) == 1, r1  # the round went on without node 2
    assert "heartbeat" in r1["failures"][0]["reason"]  # the SuperLink noticed the node was gone
    assert res["history"][2]["clients"] == [0, 1]
    assert res["test_accuracy"] == res["history"][2]["test_accuracy"]

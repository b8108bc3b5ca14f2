"""A Flower deployment on 127.0.0.1 for tests: a SuperLink and SuperNodes as real processes, each in its own
process group and tagged in its environment, so that every process a test started is shut down afterwards
(the ``fleet`` fixture checks nothing is left)."""
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged(tag: str) -> list[int]:
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
        self.port = free_port()
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
                                     "--port", str(free_port()),
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
        for pid in tagged(self.tag):  # anything left (or that left the process groups): killed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def wait_or_kill(proc, timeout):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise

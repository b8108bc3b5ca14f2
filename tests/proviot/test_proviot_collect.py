"""The collectors and the trace file: strace output parsed into provenance (threads folded into
their process, a child's lines before its clone returns, fileless exec through /proc/self/fd),
label normalisation, the checksum; auditd where the kernel lets this machine audit."""
import json
import shutil

import pytest

from repnet import RepnetError
from repnet.proviot.collect import AuditdCollector, load_trace, normalise_path, parse_strace, save_trace, socket_label

STRACE = """\
100 1.000000 execve("/usr/bin/sh", ["sh"], 0x7ffd /* 3 vars */) = 0
100 1.100000 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD <unfinished ...>
101 1.150000 execve("/usr/bin/python3", ["python3"], 0x7ffd /* 3 vars */) = 0
100 1.160000 <... clone resumed>, child_tidptr=0x7f) = 101
101 1.200000 openat(AT_FDCWD</tmp>, "/etc/hostname", O_RDONLY|O_CLOEXEC) = 3</etc/hostname>
101 1.210000 read(3</etc/hostname>, ""..., 4096) = 9
101 1.300000 clone3({flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM, child_tid=0x7f}, 88) = 102
102 1.310000 connect(4<TCP:[4711]>, {sa_family=AF_INET, sin_port=htons(5555), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 EINPROGRESS (Operation now in progress)
102 1.320000 write(4<TCP:[127.0.0.1:40000->127.0.0.1:5555]>, ""..., 10) = 10
101 1.400000 memfd_create("kworker", MFD_CLOEXEC) = 5</memfd:kworker>(deleted)
101 1.410000 write(5</memfd:kworker>(deleted), ""..., 35664) = 35664
101 1.420000 write(1</dev/null<char 1:3>>, ""..., 3) = 3
101 1.500000 execve("/proc/self/fd/5", ["kworker"], 0x7ffc /* 38 vars */) = 0
101 1.600000 openat(AT_FDCWD</tmp>, "/tmp/run42/out/12345/tmpab12cd34", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 6</tmp/run42/out/12345/tmpab12cd34>
101 1.700000 +++ exited with 0 +++
100 1.800000 --- SIGCHLD {si_signo=SIGCHLD} ---
"""


def edges(t):
    return [(t.nodes[s][2], e, t.nodes[d][2]) for _, s, e, d in t.events]


def test_strace_parse():
    t = parse_strace(STRACE.splitlines(), ["sh"], aliases=[("/tmp/run42", "$ROOT"), ("127.0.0.1:5555", "127.0.0.1:1883")])
    es = edges(t)
    assert es == [
        ("/usr/bin/sh", "FILE_EXEC", "/usr/bin/sh"),
        ("/usr/bin/sh", "PROC_CREATE", "/usr/bin/python3"),  # the child runs python3 before clone returns
        ("/usr/bin/python3", "FILE_EXEC", "/usr/bin/python3"),
        ("/etc/hostname", "READ", "/usr/bin/python3"),
        ("/usr/bin/python3", "CONNECT", "tcp:127.0.0.1:1883"),  # the thread is its process
        ("/usr/bin/python3", "SEND", "tcp:127.0.0.1:1883"),
        ("/usr/bin/python3", "WRITE", "/memfd:kworker"),
        ("/usr/bin/python3", "PROC_EXEC", "/memfd:kworker"),  # fexecve of the memfd
        ("/memfd:kworker", "FILE_EXEC", "/memfd:kworker"),
        ("/memfd:kworker", "WRITE", "$ROOT/out/N/tmp*"),
    ]
    assert sorted(t.procs) == [100, 101] and t.procs[101][0] == 100 and t.root == 100


def test_labels():
    assert normalise_path("/proc/4242/status") == "/proc/N/status"
    assert normalise_path("/tmp/#2147143") == "/tmp/#N" and normalise_path("/lib/libssl.so.3") == "/lib/libssl.so.3"
    assert normalise_path("/tmp/x/tmpq8z_k2ab/f", [("/tmp/x", "$ROOT")]) == "$ROOT/tmp*/f"
    assert normalise_path("/tmp/xy/f", [("/tmp/x", "$ROOT")]) == "/tmp/xy/f"  # a prefix is a whole component
    assert socket_label("tcp", "127.0.0.1:41000", "127.0.0.1:8080") == "tcp:127.0.0.1:8080"
    assert socket_label("tcp", "127.0.0.1:8080", "127.0.0.1:41000") == "tcp:127.0.0.1:8080"  # accepted side
    assert socket_label("tcp", "127.0.0.1:41000", "127.0.0.1:45000") == "tcp:127.0.0.1:EPH"


def test_trace_file_checksum(tmp_path):
    t = parse_strace(STRACE.splitlines(), ["sh"])
    f = save_trace(t, tmp_path / "t.json")
    back = load_trace(f)
    assert edges(back) == edges(t) and back.procs == t.procs
    doc = json.loads(f.read_text())
    doc["nodes"][1][2] = "/usr/bin/other"
    f.write_text(json.dumps(doc))
    with pytest.raises(RepnetError, match="damaged"):
        load_trace(f)
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(RepnetError, match="is not a trace"):
        load_trace(tmp_path / "x.json")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_strace_collector_real_command(tmp_path):
    from repnet.proviot.collect import collector

    out = tmp_path / "o.txt"
    t = collector("strace").run(["sh", "-c", f"cat /etc/hostname > {out}"], aliases=[(str(tmp_path), "$T")])
    es = set(edges(t))
    assert ("/etc/hostname", "READ", "/usr/bin/cat") in es
    assert any(e == "WRITE" and d == "$T/o.txt" for _, e, d in es)
    assert t.meta["exit_status"] == 0


_WHY = AuditdCollector().available()


@pytest.mark.skipif(_WHY is not None, reason=f"auditd collector unavailable here: {_WHY}")
def test_auditd_collector_real_command(tmp_path):
    import subprocess

    before = subprocess.run(["auditctl", "-s"], capture_output=True, text=True).stdout.split("\n")[0]
    out = tmp_path / "o.txt"
    t = AuditdCollector().run(["sh", "-c", f"cat /etc/hostname > {out}"], aliases=[(str(tmp_path), "$T")])
    es = set(edges(t))
    assert ("/etc/hostname", "READ", "/usr/bin/cat") in es, sorted(es)
    assert any(e == "WRITE" and d == "$T/o.txt" for _, e, d in es)
    assert any(e == "PROC_CREATE" and d == "/usr/bin/cat" for _, e, d in es)
    # its rule and daemon are gone, auditing is as it was
    assert "No rules" in subprocess.run(["auditctl", "-l"], capture_output=True, text=True).stdout
    assert subprocess.run(["auditctl", "-s"], capture_output=True, text=True).stdout.split("\n")[0] == before

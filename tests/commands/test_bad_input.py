"""The bad-input matrix: every case is one ``error:`` line and exit 2 (CLI), or one
``RepnetError`` line (API); no traceback, nothing trained. The regression suite for this area."""
import json
import pickle

import pytest
import torch

import repnet
from repnet import RepnetError
from repnet.cli import main
from tests.helpers import TINY_TRAIN_ARGS

TRAIN = [*TINY_TRAIN_ARGS, "--memory", "vanilla"]


class _Payload:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pwned')",))


@pytest.fixture
def files(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"x": _Payload()}, tmp_path / "evil.pth")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad.yaml").write_text("epochs: [\n")
    return tmp_path


CLI_CASES = [
    # train: names
    (["--method", "nope"], "unknown method 'nope'"),
    (["--backbone", "nope"], "unknown backbone 'nope'"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    # train: method options, by their dataclass
    (["--opt", "connector=sideways"], "option connector='sideways' is not valid"),
    (["--opt", "width=-1"], "option width=-1.0 is not valid: it must be > 0"),
    (["--opt", "width=0"], "option width=0.0 is not valid"),
    (["--opt", "kernel=-1"], "option kernel=-1 is not valid"),
    (["--opt", "kernel=4"], "option kernel=4 is not valid"),
    (["--opt", "groups=0"], "option groups=0 is not valid"),
    (["--opt", "dropout=1.5"], "option dropout=1.5 is not valid"),
    (["--opt", "train_bias=maybe"], "expected a bool"),
    (["--opt", "kernel=3.5"], "expected int"),
    (["--opt", "nosuch=1"], "unknown option 'nosuch'"),
    (["--opt", "connector"], "--opt expects key=value"),
    # train: config keys
    (["--set", "epochs"], "--set expects key=value"),
    (["--set", "nosuch=1"], "unknown config key 'nosuch'"),
    (["--set", "epochs=2.5"], "epochs='2.5': expected int"),
    (["--set", "int8=maybe"], "int8='maybe': expected a bool"),
    (["--set", "options=notadict"], "expected a mapping"),
    (["--set", "select_best_on=best"], "select_best_on='best' is not valid"),
    (["--set", "weight_decay=-1"], "weight_decay must be >= 0"),
    (["--lr", "0"], "lr must be a number > 0"),
    (["--lr", "-1"], "lr must be a number > 0"),
    (["--lr", "nan"], "lr must be a number > 0"),
    (["--lr", "inf"], "lr must be a number > 0"),
    (["--lr-side", "0"], "lr_side must be a number > 0"),
    (["--lr", "abc"], "expected float"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--image-size", "7"], "image_size must be >= 32"),
    (["--steps-per-epoch", "0"], "steps_per_epoch must be >= 1"),
    (["--max-steps", "0"], "max_steps must be >= 1"),
    (["--checkpoint-every", "-1"], "checkpoint_every must be >= 0"),
    (["--workers", "-1"], "workers must be >= 0"),
    (["--label-smoothing", "1"], "label_smoothing must be in [0, 1)"),
    (["--label-smoothing", "-0.1"], "label_smoothing must be in [0, 1)"),
    (["--val-fraction", "1"], "val_fraction must be in [0, 1)"),
    (["--train-subset", "0"], "train_subset must be >= 1"),
    (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["--memory", "nope"], "invalid choice: 'nope'"),
    (["--optimizer", "lion"], "invalid choice: 'lion'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--epochs"], "expected one argument"),
    (["--int8", "--method", "full"], "int8 training needs a frozen backbone"),
    # train: files and folders
    (["--resume", "{tmp}/nowhere"], "cannot resume"),
    (["--config", "{tmp}/nowhere.yaml"], "cannot read"),
    (["--config", "{tmp}/list.yaml"], "must hold a mapping"),
    (["--config", "{tmp}/bad.yaml"], "is not valid YAML"),
    (["--out", "{tmp}/mine"], "is not empty"),
    (["--out", "{tmp}/afile"], "is a file, not a folder"),
    (["--out", "{tmp}/afile/run"], "afile is a file, not a folder"),
    (["--weights", "{tmp}/nowhere.pth", "--set", "random_init=false"], "weights file not found"),
    (["--weights", "{tmp}/garbage.pth", "--set", "random_init=false"], "damaged or not a PyTorch file"),
    (["--weights", "{tmp}/evil.pth", "--set", "random_init=false"], "refused"),
    (["--dataset", "fashion_mnist", "--data-root", "{tmp}/nowhere"], "Fashion-MNIST not found"),
    (["--dataset", "flowers102"], "is not on this machine"),
    (["--batch-size", "1", "--image-size", "32", "--method", "repnet"], "batch size 1 cannot train a batch-norm"),
    # numbers: absurd sizes and rates (a traceback from Adam, or a diverged run written as a result, before)
    (["--lr", "1e38"], "lr=1e+38 is absurd"),
    (["--lr", "1e9"], "lr=1e+09 is absurd"),
    (["--lr-side", "1e38"], "lr_side=1e+38 is absurd"),
    (["--image-size", "1000000000"], "image_size must be <= 2,048"),
    (["--batch-size", "1000000000"], "batch_size must be <= 65,536"),
    (["--epochs", "1000000000"], "epochs must be <= 100,000"),
    (["--workers", "100000"], "workers must be <= 1,024"),
    (["--set", "options={a: [[[[1]]]]}"], "unknown option 'a'"),
    # contradictions
    (["--int8", "--frozen-bits", "kmeans"], "--frozen-bits kmeans contradicts it"),
    (["--runtime", "executorch", "--optimizer", "adam"], "--optimizer adam is not supported with --runtime executorch"),
]

OTHER_CASES = [
    (["--threads", "0", "list"], "--threads must be >= 1"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["profile", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["profile", "--num-classes", "1"], "--num-classes must be >= 2"),
    (["profile", "--image-size", "7", "--no-measure"], "image_size must be >= 32"),
    (["profile", "--method", "nope"], "unknown method 'nope'"),
    (["profile", "--backbone", "nope"], "unknown backbone 'nope'"),
    (["profile", "--opt", "width=0", "--no-measure"], "option width=0.0 is not valid"),
    (["export", "--run", "{tmp}/nowhere", "--out", "{tmp}/m.onnx"], "is not a saved repnet adapter"),
    (["export", "--out", "{tmp}/m.onnx"], "give --adapter or --run"),
    (["export", "--run", "{tmp}/nowhere", "--out", "{tmp}/m.onnx", "--image-size", "7"], "--image-size must be >= 32"),
    (["federated", "--clients", "0", "--set", "random_init=true"], "clients must be >= 1"),
    (["federated", "--partition", "weird", "--set", "random_init=true"], "unknown partition 'weird'"),
    (["federated", "--partition", "dirichlet:-1", "--set", "random_init=true"], "ALPHA in dirichlet:ALPHA"),
    (["federated", "--resume"], "--resume needs --out"),
    (["federated", "--rounds", "0"], "rounds and local_epochs must be >= 1"),
    (["continual", "--tasks", ","], "--tasks: empty task"),
    (["continual", "--tasks", "a=digits,a=digits", "--random-init"], "duplicate task name 'a'"),
    (["continual", "--tasks", "digits", "--method", "bias", "--random-init", "--image-size", "32"],
     "cannot share a frozen backbone"),
    (["continual", "--tasks", "digits", "--resume"], "needs its folder (--out)"),
    (["reproduce", "table9", "--dry-run"], "table9"),
    (["reproduce", "table3", "--dry-run", "--set", "dataset=x"], "would change what the table compares"),
    (["demo", "--method", "nope"], "unknown method 'nope'"),
    (["demo", "--method", ","], "--method is empty"),
    (["demo", "--image-size", "1000000000"], "image_size must be <= 2,048"),
    # numbers
    (["--threads", "100000", "list"], "--threads must be <= 4,096"),
    (["profile", "--num-classes", "1000000000000", "--no-measure"], "--num-classes must be <= 100,000"),
    (["profile", "--batch-size", "1000000000", "--no-measure"], "--batch-size must be <= 65,536"),
    (["profile", "--image-size", "1000000000", "--no-measure"], "image_size must be <= 2,048"),
    (["profile", "--no-measure", "--plot", "{tmp}/p.txt"], "give a .png, .pdf, .svg file name"),
    (["plan", "--budget", "40MB", "--num-classes", "1000000000000"], "--num-classes must be <= 100,000"),
    (["plan", "--budget", "40MB", "--image-sizes", "1000000000"], "image sizes must be <= 2,048"),
    (["plan", "--budget", "40MB", "--effective-batch", "1000000000"], "--effective-batch must be <= 65,536"),
    (["export", "--training", "--backbone", "mobilenet_v2", "--batch-size", "0", "--out", "{tmp}/b.pte"],
     "--batch-size must be >= 1"),
    (["export", "--training", "--backbone", "mobilenet_v2", "--batch-size", "-2", "--out", "{tmp}/b.pte"],
     "--batch-size must be >= 1"),
    (["export", "--training", "--backbone", "mobilenet_v2", "--num-classes", "1000000000000", "--out", "{tmp}/b.pte"],
     "num_classes must be <= 100,000"),
    (["federated", "--strategy", "fedadam", "--strategy-opt", "eta=nan"], "strategy option eta must be a finite number > 0"),
    (["federated", "--strategy", "fedadam", "--strategy-opt", "eta_l=inf"], "strategy option eta_l must be a finite"),
    (["federated", "--strategy", "fedprox", "--strategy-opt", "proximal_mu=-1"], "proximal_mu must be a finite number >= 0"),
    (["federated", "--strategy", "fedyogi", "--strategy-opt", "beta_1=1"], "beta_1 must be a finite number in [0, 1)"),
    (["federated", "--strategy", "fedyogi", "--strategy-opt", "beta_2=-0.5"], "beta_2 must be a finite number in [0, 1)"),
    (["federated", "--strategy", "fedadam", "--strategy-opt", "tau=0"], "tau must be a finite number > 0"),
    (["federated", "--round-timeout", "nan"], "round timeout must be a finite number > 0"),
    (["federated", "--set", "lr=1e38"], "lr=1e+38 is absurd"),
    # contradictions: an option that would be ignored is refused
    (["export", "--run", "{tmp}/nowhere", "--backbone", "mobilenet_v2", "--out", "{tmp}/m.onnx"],
     "--backbone applies to --training"),
    (["export", "--run", "{tmp}/nowhere", "--batch-size", "4", "--out", "{tmp}/m.onnx"], "--batch-size applies to --training"),
    (["export", "--training", "--run", "{tmp}/nowhere", "--backbone", "mobilenet_v2", "--out", "{tmp}/m.pte"],
     "--backbone describes a fresh model"),
    (["export", "--training", "--run", "{tmp}/nowhere", "--num-classes", "3", "--out", "{tmp}/m.pte"],
     "--num-classes describes a fresh model"),
    (["export", "--training", "--backbone", "mobilenet_v2", "--format", "pt2", "--out", "{tmp}/m.pte"],
     "--format applies to inference exports"),
    (["export", "--training", "--backbone", "mobilenet_v2", "--out", "{tmp}/m.onnx"], "an ExecuTorch program is a .pte"),
    (["export", "--run", "{tmp}/nowhere", "--format", "onnx", "--out", "{tmp}/m.pt2"], "--format onnx contradicts"),
    (["export", "--run", "{tmp}/nowhere", "--out", "{tmp}/m.txt"], "give a .pt2 or .onnx file name"),
    (["federated", "--flower-app", "{tmp}/app", "--resume", "--out", "{tmp}/fl"], "--resume applies to a simulation"),
    (["federated", "--flower-app", "{tmp}/app", "--overwrite"], "--overwrite applies to a simulation"),
    (["federated", "--set", "out_dir={tmp}/fl"], "--set out_dir: a federated run's folder is --out"),
    (["profile", "--runtime", "executorch", "--frozen-bits", "kmeans", "--no-measure"],
     "--frozen-bits kmeans is not supported with --runtime executorch"),
]


def _run(argv, files, capsys):
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    before = sorted(p.name for p in files.iterdir())
    code = main(argv)
    captured = capsys.readouterr()
    assert sorted(p.name for p in files.iterdir()) == before, "a refused command wrote something"
    return code, captured.err.strip()


@pytest.mark.parametrize("extra,message", CLI_CASES, ids=[" ".join(c[0])[:40] for c in CLI_CASES])
def test_train_bad_input_is_one_line(extra, message, files, capsys):
    code, err = _run([*TRAIN, "--out", str(files / "run"), *extra] if "--out" not in extra else [*TRAIN, *extra],
                     files, capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message.replace("{tmp}", str(files)) in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,message", OTHER_CASES, ids=[" ".join(c[0])[:40] for c in OTHER_CASES])
def test_other_commands_bad_input_is_one_line(argv, message, files, capsys):
    code, err = _run(argv, files, capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message in err, err


# ----------------------------------------------------------------------------- the API
def _adapter(tmp_path, name="a", **kw):
    torch.manual_seed(0)
    model = repnet.get_model("proxylessnas_mobile", kw.pop("method", "repnet"), kw.pop("num_classes", 5),
                             image_size=32, pretrained=False, **kw)
    model.save_pretrained(str(tmp_path / name))
    return tmp_path / name


API_CASES = [
    (lambda t: repnet.get_model("proxylessnas_mobile", "repnet", 10.7, pretrained=False), "whole number"),
    (lambda t: repnet.get_model("proxylessnas_mobile", "repnet", True, pretrained=False), "whole number"),
    (lambda t: repnet.get_model("proxylessnas_mobile", "repnet", 0, pretrained=False), "num_classes must be >= 1"),
    (lambda t: repnet.get_model("proxylessnas_mobile", "repnet", 3, image_size=7, pretrained=False), ">= 32"),
    (lambda t: repnet.get_model("proxylessnas_mobile", "repnet", 3, memory="x", pretrained=False), "memory mode"),
    (lambda t: repnet.get_model("proxylessnas_mobile", "nope", 3, pretrained=False), "unknown method"),
    (lambda t: repnet.get_model("proxylessnas_mobile", "repnet", 3, image_size=32, pretrained=False, groups=0),
     "groups=0"),
    (lambda t: repnet.from_pretrained(str(t / "nowhere")), "is not a saved repnet adapter"),
]


@pytest.mark.parametrize("call,message", API_CASES, ids=[m for _, m in API_CASES])
def test_api_bad_input_is_one_repnet_error(call, message, tmp_path):
    with pytest.raises(RepnetError) as e:
        call(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "config.json").write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "is malformed"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                           "num_classes": "ten"})), "is malformed"),
    (lambda d: (d / "config.json").write_text(json.dumps({k: v for k, v in json.loads((d / "config.json").read_text())
                                                           .items() if k != "method"})), "is malformed"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                           "num_classes": 7})), "does not fit its own config"),
    (lambda d: (d / "adapter.safetensors").write_bytes(b""), "damaged or not a safetensors file"),
    (lambda d: (d / "adapter.safetensors").write_bytes((d / "adapter.safetensors").read_bytes()[:100]),
     "damaged or not a safetensors file"),
    (lambda d: (d / "adapter.safetensors").write_bytes(pickle.dumps({"a": 1})), "damaged or not a safetensors"),
    (lambda d: (d / "adapter.safetensors").unlink(), "is not a saved repnet adapter"),
])
def test_damaged_adapters_are_one_repnet_error(damage, message, tmp_path):
    d = _adapter(tmp_path)
    damage(d)
    with pytest.raises(RepnetError) as e:
        torch.manual_seed(0)
        repnet.from_pretrained(str(d))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_save_pretrained_refuses_another_models_adapter_folder(tmp_path):
    d = _adapter(tmp_path, num_classes=5)
    before = (d / "adapter.safetensors").read_bytes()
    other = repnet.get_model("proxylessnas_mobile", "last", 3, image_size=32, pretrained=False)
    with pytest.raises(RepnetError, match="holds the adapter of another model"):
        other.save_pretrained(str(d))
    assert (d / "adapter.safetensors").read_bytes() == before
    other.save_pretrained(str(d), overwrite=True)
    assert json.loads((d / "config.json").read_text())["method"] == "last"


def test_the_matrix_is_large_enough():
    assert len(CLI_CASES) + len(OTHER_CASES) + len(API_CASES) >= 60


# ----------------------------------------------------------------------------- output paths, every command
# Generated from the commands: each command module declares its output arguments in OUTPUTS (dest -> file /
# folder / run); every one of them is tried as a missing parent, a path under a file, read-only locations
# and the wrong kind of existing entry (a folder for a file, a file for a folder). Each must be one
# `error:` line and exit 2 before the command's work starts (its `run` is replaced by a marker that fails
# the test if reached), with nothing changed in the test's folder. A new command, or a new output flag,
# is covered as soon as it is declared (and a command without an entry in BASE fails the test).
import importlib
import os
import subprocess

from repnet.commands import COMMANDS
from repnet.config.flags import cli_flag

#: the least arguments each command (or subcommand) parses with (the work never starts: `run` is the marker)
BASE = {("list",): [], ("profile",): ["--no-measure"], ("plan",): ["--budget", "40MB"], ("train",): [], ("demo",): [],
        ("reproduce",): ["table3"], ("continual",): ["--tasks", "digits"], ("federated",): [],
        ("export",): ["--adapter", "an-adapter"], ("proviot", "collect"): ["--", "true"],
        ("proviot", "train"): ["--paths", "benign.txt"], ("proviot", "detect"): ["--model", "m", "--paths", "p.txt"],
        ("proviot", "federated"): ["--fleet", "fleet"]}
#: a file name each file output accepts (the suffix is the format)
NAMES = {(("profile",), "plot"): "p.png", (("export",), "out"): "m.onnx"}


def _declared():
    """(command words, its outputs) for every command, and for each subcommand of a command that has them."""
    for cmd in COMMANDS:
        mod = importlib.import_module(f"repnet.commands.{cmd}")
        subs = getattr(mod, "SUBCOMMAND_OUTPUTS", None)
        yield from (((cmd, sc), outs) for sc, outs in subs.items()) if subs else [((cmd,), mod.OUTPUTS)]


OUTPUT_CASES = [(words, dest, kind) for words, outs in _declared() for dest, kind in outs.items()]


class WorkStarted(Exception):
    pass


@pytest.fixture
def marker(monkeypatch):
    """Every command's work replaced by a marker: reaching it means the paths were accepted."""
    for cmd in COMMANDS:
        def reached(args, cmd=cmd):
            raise WorkStarted(cmd)
        monkeypatch.setattr(importlib.import_module(f"repnet.commands.{cmd}"), "run", reached)


def _tree(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="session")
def read_only_tmpfs(tmp_path_factory):
    """A real read-only file system where this machine lets us mount one (root with CAP_SYS_ADMIN), else None."""
    d = tmp_path_factory.mktemp("ro-mount")
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True).returncode == 0
    yield d if ok else None
    if ok:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _paths(tmp, cmd, dest, kind, ro_mount):
    """(case, path, refused) for one output argument."""
    name = NAMES.get((cmd, dest), "x.json" if kind == "file" else "out")  # (cmd: the command's words)
    (tmp / "afile").write_text("a file")
    (tmp / "adir").mkdir(exist_ok=True)
    cases = [("missing parent", tmp / "nowhere" / "deeper" / name, kind != "run"),  # run folders: parents created
             ("under a file", tmp / "afile" / name, True),
             ("read-only: /proc", "/proc/" + name, True),  # root too cannot create files in /proc
             ("wrong kind", tmp / ("adir" if kind == "file" else "afile"), True)]
    if ro_mount is not None:
        cases.append(("read-only: tmpfs mount", ro_mount / name, True))
    if os.geteuid() != 0:  # (root writes in a 0o500 folder: it is not read-only for root)
        locked = tmp / "locked"
        locked.mkdir(mode=0o500, exist_ok=True)
        cases.append(("read-only: mode 0o500", locked / name, True))
    return cases


@pytest.mark.parametrize("cmd,dest,kind", OUTPUT_CASES, ids=["-".join([*c, d]) for c, d, _ in OUTPUT_CASES])
def test_every_output_path_is_checked_before_any_work(cmd, dest, kind, tmp_path, capsys, marker, read_only_tmpfs):
    for case, path, refused in _paths(tmp_path, cmd, dest, kind, read_only_tmpfs):
        before = _tree(tmp_path)
        argv = [*cmd, cli_flag(dest), str(path), *BASE[cmd]]
        if refused:
            code = main(argv)
            err = capsys.readouterr().err.strip()
            assert code == 2, (case, err)
            assert err.startswith("error: ") and len(err.splitlines()) == 1, (case, err)
            assert cli_flag(dest) in err, (case, err)
        else:  # a run folder's missing parents are created by the run: accepted, and nothing made before the work
            with pytest.raises(WorkStarted):
                main(argv)
        assert _tree(tmp_path) == before, case
    with pytest.raises(WorkStarted):  # a good path reaches the work: the marker can tell
        main([*cmd, cli_flag(dest), str(tmp_path / "adir" / NAMES.get((cmd, dest), "ok.json")), *BASE[cmd]])


def test_every_command_is_covered_and_every_output_flag_is_declared():
    """A new command needs an entry in BASE; an option that writes (by its help text) must be in OUTPUTS."""
    import re

    from repnet.cli import build_parser

    declared_of = dict(_declared())
    assert set(BASE) == set(declared_of)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parsers = []
    for cmd, parser in sub.choices.items():
        nested = [a for a in parser._actions if isinstance(a.choices, dict)]  # a command's own subcommands
        parsers += [((cmd, sc), p) for sc, p in nested[0].choices.items()] if nested else [((cmd,), parser)]
    assert {w for w, _ in parsers} == set(declared_of)
    for cmd, parser in parsers:
        declared = set(declared_of[cmd])
        writes = {a.dest for a in parser._actions if a.option_strings and a.help and a.nargs != 0
                  and re.search(r"\b(write|output|summaries go|folder for)|^run folder", a.help)
                  and not a.help.startswith("turn off")}
        assert writes == declared, (cmd, writes ^ declared)


# ----------------------------------------------------------------------------- readers x kinds of bad file
# Every reader of a file repnet wrote (or reads from a user) against every kind of bad file, generated
# from the reader's own schema: each field of the wrong type and each bounded field absurdly large (the
# file otherwise intact, and a checkpoint with its checksum right), undecodable bytes, deep nesting,
# another kind's file. Each is one RepnetError line, never a traceback, never torch's advice.
import zipfile

import numpy as np
import yaml

from repnet.storage import Spec, check_fields, load_checkpoint, read_run_file, save_checkpoint
from tests.helpers import one_line, tiny_train

WRONG = ["x", 12345, True, [1], {"a": 1}, 1.5, None, -7]
DEEP = 200_000


def _wrong_value(spec):
    """A value ``spec`` refuses (found by asking the reader's own checker)."""
    for v in WRONG:
        try:
            check_fields({"k": v}, {"k": spec}, "probe")
        except RepnetError:
            return v
    raise AssertionError(f"no wrong value for {spec}")


def _deep_torch(path):
    """A torch.save zip whose pickle is a list nested DEEP levels deep (a stack-based pickle: it loads)."""
    save_checkpoint({"model": {}}, path)
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    deep = b"\x80\x02}q\x00(X\x05\x00\x00\x00modelq\x01" + b"]" * DEEP + b"a" * (DEEP - 1) + b"u."
    with zipfile.ZipFile(path, "w") as z:
        for info, data in entries:
            z.writestr(info, deep if info.filename.endswith("data.pkl") else data)


def _kinds(fmt, good, fields, other):
    """(kind, writer(path)) of every bad file for a reader of format ``fmt`` whose good content is ``good``."""
    def dump(obj):
        if fmt == "json":
            return lambda p: p.write_text(json.dumps(obj))
        if fmt == "yaml":
            return lambda p: p.write_text(yaml.safe_dump(obj))
        return lambda p: save_checkpoint(obj, p)  # torch: the checksum is right, the content is not

    out = [("undecodable bytes", lambda p: p.write_bytes(b"\xff\xfe\x00\x80garbage\x00" * 20)),
           ("empty", lambda p: p.write_bytes(b"")),
           ("another kind's file", dump(other))]
    if fmt == "json":
        out.append(("deep nesting", lambda p: p.write_text("[" * DEEP + "]" * DEEP)))
        out.append(("a list", lambda p: p.write_text("[1, 2]")))
    elif fmt == "yaml":
        out.append(("deep nesting", lambda p: p.write_text("a: " + "[" * DEEP + "]" * DEEP)))
        out.append(("a list", lambda p: p.write_text("- 1\n- 2\n")))
    else:
        out.append(("deep nesting", _deep_torch))
    for key, spec in fields.items():
        out.append((f"wrong type: {key}", dump({**good, key: _wrong_value(spec)})))
        high = getattr(spec, "high", None)
        if high is not None:
            out.append((f"absurd size: {key}", dump({**good, key: high * 1000 + 1})))
        if not isinstance(spec, Spec) or spec.required:
            out.append((f"missing: {key}", dump({k: v for k, v in good.items() if k != key})))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny training run (config.yaml, checkpoint.pt, results.json, adapter/, repnet-run.json)."""
    torch.manual_seed(0)
    return tiny_train(tmp_path_factory.mktemp("readers"), "run")


@pytest.fixture(scope="module")
def continual_dir(tmp_path_factory):
    from repnet.continual.sequence import train_sequence

    out = tmp_path_factory.mktemp("readers-cl") / "cl"
    train_sequence("digits", backbone="proxylessnas_mobile", method="last", out_dir=out, random_init=True,
                   image_size=32, epochs=1, train_subset=32, test_subset=16, workers=0, progress=False)
    return out


def _readers(run_dir, continual_dir):
    """name -> (fmt, the good file, its fields, a file of another kind, read(path))."""
    import repnet.federated.core as fed
    import repnet.training.run as training
    from repnet.api import ADAPTER_FIELDS
    from repnet.continual.model import CONFIG_FIELDS, MultiTaskModel
    from repnet.continual.sequence import RESULTS_FIELDS as CL_FIELDS, read_results as read_cl
    from repnet.training.tune import STATE_FIELDS, read_state

    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    fed_ckpt = {"round": 1, "global_state": {"w": torch.zeros(2)}, "history": [{"round": 0, "test_accuracy": 0.1}],
                "strategy_state": {}, "settings": {"config": {}}}
    adapter = json.loads((run_dir / "adapter" / "config.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    cl = json.loads((continual_dir / "results.json").read_text())
    mt = json.loads((continual_dir / "model" / "config.json").read_text())
    tune = {"key": "lr", "steps_per_trial": 2, "trials": [{"value": 1e-3, "diverged": False, "val_accuracy": 0.5,
                                                           "val_loss": 1.0}]}
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {
        "train checkpoint": ("torch", ckpt, training.CHECKPOINT_FIELDS, fed_ckpt,
                             lambda p: load_checkpoint(p, fields=training.CHECKPOINT_FIELDS)),
        "federated checkpoint": ("torch", fed_ckpt, fed.CHECKPOINT_FIELDS, ckpt,
                                 lambda p: load_checkpoint(p, fields=fed.CHECKPOINT_FIELDS)),
        "adapter config": ("json", adapter, ADAPTER_FIELDS, results,
                           lambda p: repnet.from_pretrained(str(p.parent))),
        "run results": ("json", results, training.RESULTS_FIELDS, adapter, lambda p: training.read_results(p.parent)),
        "continual results": ("json", cl, CL_FIELDS, results, lambda p: read_cl(p.parent)),
        "multi-task config": ("json", mt, {k: v for k, v in CONFIG_FIELDS.items() if k != "format"}, results,
                              lambda p: MultiTaskModel.load(p.parent)),
        "tuning state": ("json", tune, STATE_FIELDS, results, lambda p: read_state(p, "lr", 2)),
        "run record": ("json", {"kind": "run", "state": "finished"}, {"kind": str, "state": str}, results,
                       lambda p: read_run_file(p.parent)),
        "run config": ("yaml", config, {}, results, lambda p: training.resume_config(p.parent)),
    }


READER_NAMES = ["train checkpoint", "federated checkpoint", "adapter config", "run results", "continual results",
                "multi-task config", "tuning state", "run record", "run config"]
FILE_OF = {"train checkpoint": "checkpoint.pt", "federated checkpoint": "checkpoint.pt",
           "adapter config": "adapter/config.json", "run results": "results.json",
           "continual results": "results.json", "multi-task config": "model/config.json",
           "tuning state": "tune.json", "run record": "repnet-run.json", "run config": "config.yaml"}


@pytest.mark.parametrize("reader", READER_NAMES)
def test_every_reader_refuses_every_kind_of_bad_file_in_one_line(reader, run_dir, continual_dir, tmp_path):
    import shutil

    fmt, good, fields, other, read = _readers(run_dir, continual_dir)[reader]
    src = continual_dir if reader in ("continual results", "multi-task config") else run_dir
    kinds = _kinds(fmt, good, fields, other)
    if reader == "run config":  # the config's schema is TrainConfig: every field, wrong; every bounded size, absurd
        from repnet.config.schema import FIELDS

        for key, f in FIELDS.items():
            bad = {"bool": "maybe", "int": "many", "float": "a lot", "str": [1, 2], "dict": "notadict"}[
                str(f.type).replace(" | None", "")]
            kinds.append((f"wrong type: {key}", (lambda obj: lambda p: p.write_text(yaml.safe_dump(obj)))(
                {**good, key: bad})))
        for key in ("image_size", "batch_size", "epochs", "accum_steps", "max_steps", "workers", "lr", "lr_side"):
            kinds.append((f"absurd size: {key}", (lambda obj: lambda p: p.write_text(yaml.safe_dump(obj)))(
                {**good, key: 10**13 if isinstance(good.get(key, 1), int) and key not in ("lr", "lr_side") else 1e38})))
    assert len(kinds) >= 8
    for kind, write in kinds:
        folder = tmp_path / kind.replace(":", "").replace(" ", "_").replace("'", "")
        shutil.copytree(src, folder)
        path = folder / FILE_OF[reader]
        write(path)
        with pytest.raises(RepnetError) as e:
            read(path)
        msg = one_line(e)
        assert "Traceback" not in msg, (kind, msg)
    folder = tmp_path / "good"  # the good content, written the same way, reads: the reader can tell
    shutil.copytree(src, folder)
    _kinds(fmt, good, {}, good)[2][1](folder / FILE_OF[reader])
    read(folder / FILE_OF[reader])


def test_cli_readers_refuse_in_one_line(run_dir, tmp_path, capsys, tiny_train_args):
    """The readers' refusals reach the user as one `error:` line (through the commands that read)."""
    import shutil

    cases = []
    r1 = tmp_path / "r1"
    shutil.copytree(run_dir, r1)
    (r1 / "repnet-run.json").unlink()
    (r1 / "results.json").unlink()
    save_checkpoint({"round": 1, "global_state": {}, "history": [], "settings": {}}, r1 / "checkpoint.pt")
    cases.append((["train", "--resume", str(r1), "--workers", "0", "--quiet"], "is malformed: model is missing"))
    r2 = tmp_path / "r2"
    shutil.copytree(run_dir, r2)
    cfg = json.loads((r2 / "adapter" / "config.json").read_text())
    (r2 / "adapter" / "config.json").write_text(json.dumps({**cfg, "int8": "yes"}))
    cases.append((["export", "--run", str(r2), "--out", str(tmp_path / "m.onnx")], "int8 is 'yes'"))
    (tmp_path / "huge.yaml").write_text("image_size: 1000000000\n")
    cases.append(([*tiny_train_args[:1], "--config", str(tmp_path / "huge.yaml"), "--out", str(tmp_path / "r3")],
                  "image_size must be <= 2,048"))
    r4 = tmp_path / "r4"
    shutil.copytree(run_dir, r4)
    (r4 / "config.yaml").write_text("num_classes: 1000000000000\n")
    cases.append((["train", "--resume", str(r4)], "unknown config key 'num_classes'"))
    r5 = tmp_path / "r5"
    shutil.copytree(run_dir, r5)
    (r5 / "config.yaml").write_text(yaml.safe_dump({**yaml.safe_load((run_dir / "config.yaml").read_text()),
                                                    "image_size": 10**9}))
    cases.append((["train", "--resume", str(r5)], "image_size must be <= 2,048"))
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert message in err, err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "r3").exists()


def test_absurd_sizes_are_refused_where_models_are_built():
    for kw, message in [({"num_classes": 10**12}, "num_classes must be <= 100,000"),
                        ({"num_classes": 10, "image_size": 10**9}, "image_size must be <= 2,048")]:
        with pytest.raises(RepnetError, match=message):
            repnet.get_model("proxylessnas_mobile", "last", pretrained=False, **kw)


# ----------------------------------------------------------------------------- dataset formats
def _cifar(root, labels=None, n=4, meta=None, batch=None):
    """A CIFAR-10 python folder of ``n`` images per batch (pickles of plain data, as the originals)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump(meta if meta is not None else {"label_names": [f"c{i}" for i in range(10)]}, f)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = batch if batch is not None else {
            "data": np.zeros((n, 3072), np.uint8), "labels": list(labels if labels is not None else range(n))}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
    return root


def _deep_pickle(path):
    path.write_bytes(b"\x80\x02" + b"]" * DEEP + b"a" * (DEEP - 1) + b".")


@pytest.mark.parametrize("make,message", [
    (lambda r: _cifar(r, labels=[0, 1, 99, 3]), "label 99 is outside 0..9 (10 classes)"),
    (lambda r: _cifar(r, labels=[0, -1, 2, 3]), "label -1 is outside 0..9"),
    (lambda r: _cifar(r, labels=["a", "b", "c", "d"]), "is malformed"),
    (lambda r: _cifar(r, batch={"data": np.zeros((4, 3072), np.uint8)}), "is malformed"),
    (lambda r: _cifar(r, batch={"data": np.zeros((4, 7), np.uint8), "labels": [0, 1, 2, 3]}), "is malformed"),
    (lambda r: _cifar(r, batch=[1, 2, 3]), "does not hold a CIFAR batch"),
    (lambda r: _cifar(r, meta={"other": 1}), "has no 'label_names' entry"),
    (lambda r: (_cifar(r), (r / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\xff\x00garbage" * 9)),
     "is corrupt or not a python pickle"),
    (lambda r: (_cifar(r), _deep_pickle(r / "cifar-10-batches-py" / "data_batch_1")), "nested too deeply"),
])
def test_dataset_files_are_refused_in_one_line(make, message, tmp_path, capsys):
    from repnet.data.native import read_cifar

    make(tmp_path)
    with pytest.raises(RepnetError) as e:
        read_cifar(tmp_path, 10)
    assert message in one_line(e)
    code = main([*TRAIN, "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_good_cifar_folder_reads(tmp_path):
    from repnet.data.native import read_cifar

    train, test = read_cifar(_cifar(tmp_path, labels=[0, 9, 2, 3]), 10)
    assert len(train) == 20 and len(test) == 4 and sorted(set(train.targets.tolist())) == [0, 2, 3, 9]


# ----------------------------------------------------------------------------- the repnet list cache
@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "binary", "edited", "device", "fifo", "folder"])
def test_a_list_cache_that_does_not_verify_is_rebuilt(damage, tmp_path, monkeypatch, capsys):
    from repnet.commands.list import cache_file, read_cache

    monkeypatch.setenv("REPNET_CACHE", str(tmp_path / "cache"))
    assert main(["list"]) == 0
    truth = capsys.readouterr().out
    path = cache_file(False)
    good = path.read_bytes()
    assert read_cache(path) == truth
    path.unlink()
    if damage == "garbage":
        path.write_text("backbones:\n  no_such_backbone   printed as the truth\n")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif damage == "edited":  # the header of the real text, the text changed
        path.write_bytes(good.replace(b"backbones:", b"backbonez:"))
    elif damage == "device":
        path.symlink_to("/dev/zero")
    elif damage == "fifo":
        os.mkfifo(path)  # reading it would block forever
    else:
        path.mkdir()
    assert read_cache(path) is None
    assert main(["list"]) == 0
    assert capsys.readouterr().out == truth  # the registries' listing, not the damaged file
    if damage in ("garbage", "empty", "truncated", "binary", "edited"):
        assert read_cache(path) == truth  # rebuilt: later runs are fast again
    assert main(["list"]) == 0 and capsys.readouterr().out == truth

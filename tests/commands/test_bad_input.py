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
]


def _run(argv, files, capsys):
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    code = main(argv)
    captured = capsys.readouterr()
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

#: the least arguments each command parses with (the work never starts: `run` is the marker)
BASE = {"list": [], "profile": ["--no-measure"], "plan": ["--budget", "40MB"], "train": [], "demo": [],
        "reproduce": ["table3"], "continual": ["--tasks", "digits"], "federated": [],
        "export": ["--adapter", "an-adapter"]}
#: a file name each file output accepts (the suffix is the format)
NAMES = {("profile", "plot"): "p.png", ("export", "out"): "m.onnx"}
OUTPUT_CASES = [(cmd, dest, kind) for cmd in COMMANDS
                for dest, kind in importlib.import_module(f"repnet.commands.{cmd}").OUTPUTS.items()]


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
        subprocess.run(["umount", str(d)], capture_output=True)


def _paths(tmp, cmd, dest, kind, ro_mount):
    """(case, path, refused) for one output argument."""
    name = NAMES.get((cmd, dest), "x.json" if kind == "file" else "out")
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


@pytest.mark.parametrize("cmd,dest,kind", OUTPUT_CASES, ids=[f"{c}-{d}" for c, d, _ in OUTPUT_CASES])
def test_every_output_path_is_checked_before_any_work(cmd, dest, kind, tmp_path, capsys, marker, read_only_tmpfs):
    for case, path, refused in _paths(tmp_path, cmd, dest, kind, read_only_tmpfs):
        before = _tree(tmp_path)
        argv = [cmd, *BASE[cmd], cli_flag(dest), str(path)]
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
        main([cmd, *BASE[cmd], cli_flag(dest), str(tmp_path / "adir" / NAMES.get((cmd, dest), "ok.json"))])


def test_every_command_is_covered_and_every_output_flag_is_declared():
    """A new command needs an entry in BASE; an option that writes (by its help text) must be in OUTPUTS."""
    import re

    from repnet.cli import build_parser

    assert set(BASE) == set(COMMANDS)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for cmd, parser in sub.choices.items():
        declared = set(importlib.import_module(f"repnet.commands.{cmd}").OUTPUTS)
        writes = {a.dest for a in parser._actions if a.option_strings and a.help and a.nargs != 0
                  and re.search(r"\b(write|output|summaries go|folder for)|^run folder", a.help)
                  and not a.help.startswith("turn off")}
        assert writes == declared, (cmd, writes ^ declared)

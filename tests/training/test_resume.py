"""Resuming a training run: a crafted checkpoint is refused, a torn log line is dropped, Ctrl-C resumes bit-identically."""
import json
import pytest
import torch
from repnet.cli import main
from repnet.storage import (load_checkpoint, read_safetensors)
from tests.helpers import evil_torch, tiny_train


def test_train_resume_refuses_a_checkpoint_with_code(tmp_path, capsys):
    run = tiny_train(tmp_path, "run")
    evil_torch(run / "checkpoint.pt", tmp_path / "marker")
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "refused" in err
    assert not (tmp_path / "marker").exists()


def test_torn_log_line_does_not_break_resume(tmp_path):
    run = tiny_train(tmp_path, "run")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "tra')
    from repnet.storage import truncate_log

    truncate_log(run / "log.jsonl", 1)
    lines = (run / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]


# ----------------------------------------------------------------------------- Ctrl-C, run folders, exports
def test_ctrl_c_writes_a_checkpoint_and_the_resumed_run_is_bit_identical(tmp_path):
    import os
    import signal

    from repnet.errors import Interrupted
    from repnet.training.run import make_config, resume_config, train

    kw = dict(dataset="digits", backbone="proxylessnas_mobile", random_init=True, method="repnet", memory="vanilla",
              image_size=32, epochs=2, steps_per_epoch=4, workers=0, progress=False, profile_memory=False,
              augment="basic")
    train(make_config({**kw, "out_dir": str(tmp_path / "ref")}))

    def ctrl_c(info):
        if info["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="continue with: repnet train --resume"):
        train(make_config({**kw, "out_dir": str(tmp_path / "cut")}), on_step=ctrl_c)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["state"]["step"] == 3
    train(resume_config(tmp_path / "cut"), resume=str(tmp_path / "cut"))
    a = read_safetensors(tmp_path / "ref" / "adapter" / "adapter.safetensors")
    b = read_safetensors(tmp_path / "cut" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

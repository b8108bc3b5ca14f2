"""Federated averaging of adapters: exact weighted means, disjoint shards, a backbone that never
changes or travels, message sizes equal to the tensors exchanged, and accuracy that rises."""
import json

import numpy as np
import pytest
import torch

from repnet import RepnetError
from repnet.cli import main
from repnet.federated import fedavg_states, partition, run_federated, state_bytes

QUICK = dict(dataset="digits", backbone="mobilenet_v2", method="repnet", memory="vanilla", image_size=48,
             batch_size=16, workers=0, progress=False, lr=3e-3, lr_side=3e-3, label_smoothing=0.0, augment="none")


def test_fedavg_is_the_weighted_mean_and_counters_take_the_max():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(5)}
    avg = fedavg_states([a, b], [1, 3])
    torch.testing.assert_close(avg["w"], torch.tensor([(1 + 3 * 4) / 4, (2 + 3 * 8) / 4]))
    assert avg["n"].item() == 5 and avg["n"].dtype == torch.int64
    assert state_bytes(a) == 2 * 4 + 8


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3"])
def test_partition_is_a_disjoint_seeded_cover(scheme):
    y = np.repeat(np.arange(5), 40)
    parts = partition(y, 4, scheme, seed=1)
    assert len(parts) == 4
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(y)))
    assert [p.tolist() for p in parts] == [p.tolist() for p in partition(y, 4, scheme, seed=1)]
    if scheme == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    else:  # label skew: some client's class histogram is far from uniform
        hists = [np.bincount(y[p], minlength=5) / max(len(p), 1) for p in parts if len(p)]
        assert max(h.max() for h in hists) > 0.4


def test_partition_errors_are_one_line():
    with pytest.raises(RepnetError, match="dirichlet"):
        partition([0, 1, 0, 1], 2, "dirichlet:-1")
    with pytest.raises(RepnetError, match="unknown partition"):
        partition([0, 1, 0, 1], 2, "shards")
    with pytest.raises(RepnetError, match="clients"):
        partition([0, 1], 3)


def test_fedavg_training_raises_accuracy_and_leaves_the_backbone(tmp_path):
    res = run_federated({**QUICK, "train_subset": 480}, clients=3, rounds=3, local_epochs=1, scheme="iid",
                        out_dir=str(tmp_path / "fl"), progress=False)
    accs = [h["test_accuracy"] for h in res["history"]]
    assert accs[-1] > accs[0] + 0.2, accs
    assert res["frozen_backbone_tensors_changed"] == []
    assert res["backbone_tensors_exchanged"] > 0  # repnet trains the backbone biases (train_bias=true)
    assert len(res["client_images"]) == 3 and max(res["client_images"]) - min(res["client_images"]) <= 1
    saved = json.loads((tmp_path / "fl" / "results.json").read_text())
    assert saved["test_accuracy"] == accs[-1]
    # a message is exactly the adapter that is saved: trained tensors (+ buffers of added modules)
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "fl" / "adapter" / "adapter.safetensors"))
    assert res["message_bytes"] == state_bytes(adapter)
    assert res["message_bytes"] < res["full_model_bytes"] / 2
    assert res["total_bytes"] == 2 * 3 * 3 * res["message_bytes"]


def test_cli_federated(tmp_path, capsys):
    rc = main(["federated", "--backbone", "proxylessnas_mobile", "--clients", "2", "--rounds", "1", "--quiet",
               "--set", "random_init=true", "--set", "image_size=32", "--set", "train_subset=200",
               "--set", "workers=0", "--set", "batch_size=16", "--set", "memory=vanilla"])
    assert rc == 0, capsys.readouterr().err
    assert "test accuracy by round" in capsys.readouterr().out
    assert main(["federated", "--partition", "dirichlet:x", "--set", "random_init=true", "--quiet",
                 "--set", "image_size=32", "--backbone", "proxylessnas_mobile"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: partition")


class _Stop(Exception):
    pass


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    kw = dict(clients=2, rounds=3, local_epochs=1, scheme="dirichlet:1.0", progress=False)
    ov = {**QUICK, "train_subset": 160, "augment": "basic"}  # augmentation + dropout: RNG state matters
    ref = run_federated(ov, out_dir=str(tmp_path / "ref"), **kw)

    def crash(r):
        if r == 2:
            raise _Stop

    with pytest.raises(_Stop):
        run_federated(ov, out_dir=str(tmp_path / "cut"), on_round=crash, **kw)
    assert not (tmp_path / "cut" / "results.json").exists()
    with pytest.raises(RepnetError, match="already holds a federated run"):
        run_federated(ov, out_dir=str(tmp_path / "cut"), **kw)
    with pytest.raises(RepnetError, match="settings differ"):
        run_federated({**ov, "lr": 1e-3}, out_dir=str(tmp_path / "cut"), resume=True, **kw)
    res = run_federated(ov, out_dir=str(tmp_path / "cut"), resume=True, **kw)
    assert [h["test_accuracy"] for h in res["history"]] == [h["test_accuracy"] for h in ref["history"]]
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)["global_state"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["global_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_int8_clients(tmp_path):
    from repnet.int8 import int8_layers

    seen = []
    res = run_federated({**QUICK, "train_subset": 160, "int8": True}, clients=2, rounds=1, progress=False,
                        out_dir=str(tmp_path / "q"), on_round=lambda r: seen.append(r))
    assert seen == [1] and res["frozen_backbone_tensors_changed"] == []
    from repnet import from_pretrained

    model = from_pretrained(str(tmp_path / "q" / "adapter"))
    assert len(int8_layers(model)) > 0  # the saved adapter records and re-applies int8 training

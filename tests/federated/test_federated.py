"""Federated learning of adapters on Flower: disjoint shards, the run config round trip, screened
replies (a corrupt or partial message never reaches the global adapter), the strategy's exact
weighted mean, a backbone that never changes or travels, message sizes counted from the
messages, accuracy that rises, bit-identical resume, INT8 messages."""
import json

import numpy as np
import pytest
import torch

from repnet import RepnetError
from repnet.cli import main
from repnet.federated.core import LocalClient, Server, Settings, decode_arrays, encode_state, partition, screen_reply
from repnet.federated.run import run_federated, state_bytes, write_app
from tests.helpers import TINY as HELPER_TINY

QUICK = dict(dataset="digits", backbone="mobilenet_v2", method="repnet", memory="vanilla", image_size=48,
             batch_size=16, workers=0, progress=False, lr=3e-3, lr_side=3e-3, label_smoothing=0.0, augment="none")
TINY = {**HELPER_TINY, "memory": "vanilla", "batch_size": 16, "train_subset": 96, "test_subset": 32}


@pytest.fixture
def in_app():
    """Flower messages can only be made inside an app's process: give this one a run identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


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


def test_partition_and_settings_errors_are_one_line():
    with pytest.raises(RepnetError, match="dirichlet"):
        partition([0, 1, 0, 1], 2, "dirichlet:-1")
    with pytest.raises(RepnetError, match="unknown partition"):
        partition([0, 1, 0, 1], 2, "shards")
    with pytest.raises(RepnetError, match="clients"):
        partition([0, 1], 3)
    with pytest.raises(RepnetError, match="unknown strategy 'fedsgd'"):
        Settings({}, strategy="fedsgd")
    with pytest.raises(RepnetError, match="has no option eta"):
        Settings({}, strategy="fedprox", strategy_options={"eta": 1})
    with pytest.raises(RepnetError, match="min_clients"):
        Settings({}, clients=2, min_clients=3)


def test_settings_travel_as_flower_run_config_and_come_back_equal(tmp_path):
    s = Settings({**TINY, "lr": 3e-4, "options": {"width": 2, "train_bias": False}}, clients=3, rounds=4,
                 partition="dirichlet:0.5", strategy="fedprox", strategy_options={"proximal_mu": 0.1}, min_clients=2)
    rc = s.run_config()
    assert all(isinstance(v, (str, int, float, bool)) for v in rc.values())  # what Flower's run config holds
    back = Settings.from_run_config(rc)
    assert back.identity() == s.identity() and back.rounds == 4 and back.needed == 2
    # the app folder for `flwr run` carries the same run config
    import tomllib

    toml = tomllib.loads(write_app(str(tmp_path / "app"), s.overrides, clients=3, rounds=4, scheme="dirichlet:0.5",
                                   strategy="fedprox", strategy_options={"proximal_mu": 0.1},
                                   min_clients=2).read_text())
    assert toml["tool"]["flwr"]["app"]["components"] == {"serverapp": "repnet.flower_app:server_app",
                                                         "clientapp": "repnet.flower_app:client_app"}
    assert Settings.from_run_config(toml["tool"]["flwr"]["app"]["config"]).identity() == s.identity()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.py").write_text("")
    with pytest.raises(RepnetError, match="other files"):
        write_app(str(tmp_path / "other"), s.overrides)


def _reply(to, state, n, pid=0):
    from flwr.app import Message, MetricRecord, RecordDict

    from repnet.federated.core import encode_state as enc

    return Message(RecordDict({"arrays": enc(torch.nn.Module(), state),
                               "metrics": MetricRecord({"num-examples": n, "partition-id": pid})}), reply_to=to)


def _msg():
    from flwr.app import Message, RecordDict

    return Message(RecordDict(), dst_node_id=7, message_type="train")


def test_screen_accepts_the_adapter_and_rejects_corrupt_or_partial_replies(in_app):
    from flwr.app import Error, Message

    expected = {"a.weight": torch.zeros(3, 2), "b.bias": torch.zeros(4)}
    good = {"a.weight": torch.randn(3, 2), "b.bias": torch.randn(4)}
    c, why = screen_reply(_reply(_msg(), good, 5, pid=2), expected)
    assert why == "" and c["num_examples"] == 5 and c["partition_id"] == 2
    assert all(torch.equal(c["state"][k], good[k]) for k in good)
    assert c["data_bytes"] == state_bytes(good) and c["data_bytes"] < c["wire_bytes"] < c["data_bytes"] + 2 * 200

    def reason(msg):
        c, why = screen_reply(msg, expected)
        assert c is None
        return why

    assert "error reply: gone" == reason(Message(Error(code=5, reason="gone"), reply_to=_msg()))
    assert "keys differ" in reason(_reply(_msg(), {"a.weight": good["a.weight"]}, 5))  # partial
    assert "keys differ" in reason(_reply(_msg(), {**good, "c": torch.zeros(1)}, 5))
    assert "(4, 2)" in reason(_reply(_msg(), {**good, "a.weight": torch.zeros(4, 2)}, 5))
    assert "float64" in reason(_reply(_msg(), {**good, "b.bias": torch.zeros(4, dtype=torch.float64)}, 5))
    assert "non-finite" in reason(_reply(_msg(), {**good, "b.bias": torch.tensor([0, float("nan"), 0, 0])}, 5))
    assert "num-examples" in reason(_reply(_msg(), good, 0))
    corrupt = _reply(_msg(), good, 5)
    arr = corrupt.content["arrays"]["a.weight"]
    arr.data = arr.data[: len(arr.data) // 2]  # a message cut short in transit
    assert "do not decode" in reason(corrupt)


class FakeGrid:
    """A Grid whose nodes answer with a function of (node, round, message): to check the server's
    loop without processes."""

    def __init__(self, nodes, answer):
        self.nodes, self.answer, self.round = nodes, answer, 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        self.round += 1
        return [r for m in messages if (r := self.answer(m.metadata.dst_node_id, self.round, m)) is not None]


def test_server_takes_the_strategys_exact_weighted_mean_of_usable_replies_only(tmp_path, in_app):
    s = Settings(TINY, clients=3, rounds=2, min_clients=2, out=str(tmp_path / "run"))
    server = Server(s)
    keys = list(server.expected)
    sent = []

    def answer(node, rnd, msg):
        g = decode_arrays(msg.content["arrays"])
        sent.append(g)
        if node == 2 and rnd == 1:  # round 1: node 2 sends a NaN adapter; round 2: node 2 is gone
            return _reply(msg, {**g, keys[0]: g[keys[0]] * float("nan")}, 10, pid=2)
        if node == 2:
            return None
        return _reply(msg, {k: v + (node + 1) * rnd for k, v in g.items()}, 10 * (node + 1), pid=node)

    res = server.run(FakeGrid([0, 1, 2], answer))
    h1, h2 = res["history"][1], res["history"][2]
    assert h1["clients"] == [0, 1] and [f["reason"] for f in h1["failures"]] == [f"{keys[0]}: non-finite values"]
    assert h2["clients"] == [0, 1] and "timeout" in h2["failures"][0]["reason"]
    # FedAvg over nodes 0 (10 images, +1 per round) and 1 (20 images, +2 per round): global + 5/3 * round
    g0, g2 = sent[0], sent[-1]
    final = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["global_state"]
    for k in keys:
        if g0[k].is_floating_point():
            torch.testing.assert_close(g2[k], g0[k] + 5 / 3, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(final[k], g0[k] + 5 / 3 * 3, rtol=1e-5, atol=1e-5)
    assert res["frozen_backbone_tensors_changed"] == []
    # a round with fewer usable replies than min_clients: one line, and the last good round stays on disk
    s2 = Settings(TINY, clients=3, rounds=1, min_clients=2, out=str(tmp_path / "bad"))
    with pytest.raises(RepnetError, match="round 1: 1 usable client replies, 2 needed"):
        Server(s2).run(FakeGrid([0, 1, 2], lambda n, r, m: answer(n, r, m) if n == 0 else None))
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_flower_training_raises_accuracy_and_sends_only_the_adapter(tmp_path):
    res = run_federated({**QUICK, "train_subset": 480}, clients=3, rounds=3, local_epochs=1, scheme="iid",
                        out_dir=str(tmp_path / "fl"), progress=False)
    accs = [h["test_accuracy"] for h in res["history"]]
    assert res["framework"] == "flower" and accs[-1] > accs[0] + 0.2, accs
    assert res["frozen_backbone_tensors_changed"] == []
    assert res["backbone_tensors_exchanged"] > 0  # repnet trains the backbone biases (train_bias=true)
    assert len(res["client_images"]) == 3 and max(res["client_images"]) - min(res["client_images"]) <= 1
    saved = json.loads((tmp_path / "fl" / "results.json").read_text())
    assert saved["test_accuracy"] == accs[-1]
    # what travels, counted from the messages, is exactly the saved adapter's tensors (+ npy headers)
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "fl" / "adapter" / "adapter.safetensors"))
    for h in res["history"][1:]:
        assert h["clients"] == [0, 1, 2] and h["failures"] == []
        assert h["tensor_bytes_sent_per_client"] == state_bytes(adapter) == res["adapter_bytes"]
        assert set(h["tensor_bytes_received"].values()) == {state_bytes(adapter)}
        assert 0 < h["bytes_sent_per_client"] - state_bytes(adapter) < 200 * len(adapter)
    assert res["message_bytes"] < res["full_model_bytes"] / 5
    assert res["total_bytes"] == 2 * 3 * 3 * res["message_bytes"]
    mem = res["client_training_memory_mb"]
    assert 0 < mem["analytic_mb"] < mem["analytic_with_optimizer_mb"] and mem["measured_saved_mb"] > 0


def test_cli_federated(tmp_path, capsys):
    rc = main(["federated", "--backbone", "proxylessnas_mobile", "--clients", "2", "--rounds", "1", "--quiet",
               "--strategy", "fedprox", "--strategy-opt", "proximal_mu=0.1",
               "--set", "random_init=true", "--set", "image_size=32", "--set", "train_subset=200",
               "--set", "workers=0", "--set", "batch_size=16", "--set", "memory=vanilla"])
    assert rc == 0, capsys.readouterr().err
    assert "Flower fedprox" in capsys.readouterr().out
    assert main(["federated", "--partition", "dirichlet:x", "--set", "random_init=true", "--quiet",
                 "--set", "image_size=32", "--backbone", "proxylessnas_mobile"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: partition")
    assert main(["federated", "--strategy", "fedsgd", "--quiet"]) == 2
    assert "unknown strategy" in capsys.readouterr().err


def test_fedprox_pulls_a_client_towards_the_global_adapter(in_app):
    s = Settings(TINY, clients=2)
    client = LocalClient(s, 0, 2)
    start = encode_state(client.model, client.model.trainable_state_dict())
    g = decode_arrays(start)
    params = [n for n, p in client.model.named_parameters() if p.requires_grad]  # (not the side net's BN stats)

    def dist(mu):
        arrays, _ = client.train(encode_state(client.model, g), server_round=1, proximal_mu=mu)
        new = decode_arrays(arrays)
        return sum(float((new[k] - g[k]).pow(2).sum()) for k in params)

    assert dist(100.0) < 0.5 * dist(0.0)
    assert dist(0.0) == dist(0.0)  # a client's round is a function of (global, seed, round, client)


class _Stop(Exception):
    pass


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    kw = dict(clients=2, rounds=3, local_epochs=1, scheme="dirichlet:1.0", progress=False, strategy="fedyogi")
    ov = {**TINY, "train_subset": 160, "augment": "basic"}  # augmentation + dropout: RNG state matters
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
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert a["global_state"].keys() == b["global_state"].keys()
    assert all(torch.equal(a["global_state"][k], b["global_state"][k]) for k in a["global_state"])
    assert set(a["strategy_state"]) == {"m_t", "v_t"}  # FedYogi's moments are part of the checkpoint


def test_int8_clients_send_int8_codes(tmp_path):
    from repnet import from_pretrained
    from repnet.memory.int8 import int8_layers

    seen = []
    res = run_federated({**QUICK, "train_subset": 96, "int8": True, "int8_master": "int8"}, clients=2, rounds=1,
                        progress=False, out_dir=str(tmp_path / "q"), on_round=lambda r: seen.append(r))
    assert seen == [1] and res["frozen_backbone_tensors_changed"] == []
    fp32 = res["adapter_bytes"]
    got = res["history"][1]["tensor_bytes_received"]
    assert all(b < 0.5 * fp32 for b in got.values()), (got, fp32)  # weights as 1-byte codes + a scale
    model = from_pretrained(str(tmp_path / "q" / "adapter"))
    assert len(int8_layers(model)) > 0  # the saved adapter records and re-applies int8 training


@pytest.mark.parametrize("option", ["eta=nan", "eta=inf", "eta_l=nan", "beta_1=1", "beta_2=-0.1", "tau=0"])
def test_a_nan_strategy_option_is_refused_before_anything_runs(option, tmp_path):
    key, value = option.split("=")
    with pytest.raises(RepnetError, match=f"strategy option {key} must be a finite number"):
        Settings(TINY, clients=2, rounds=1, strategy="fedadam", strategy_options={key: value},
                 out=str(tmp_path / "run"))
    with pytest.raises(RepnetError, match="proximal_mu must be a finite number >= 0"):
        Settings(TINY, clients=2, strategy="fedprox", strategy_options={"proximal_mu": "-1"})
    assert not (tmp_path / "run").exists()


def test_a_non_finite_aggregate_is_never_written(tmp_path, in_app, monkeypatch):
    """Should a strategy's own arithmetic give NaN (here FedAdam's eta set to NaN after round 1, past the
    settings' check), the round stops in one line: no checkpoint of it, no adapter, no results."""
    from repnet.storage import load_checkpoint, non_finite

    built = {}
    real_strategy = Server._strategy

    def strategy(self):
        built["s"] = real_strategy(self)
        return built["s"]

    monkeypatch.setattr(Server, "_strategy", strategy)
    s = Settings(TINY, clients=2, rounds=2, strategy="fedadam", out=str(tmp_path / "run"))
    server = Server(s, on_round=lambda r: setattr(built["s"], "eta", float("nan")))

    def answer(node, rnd, msg):
        g = decode_arrays(msg.content["arrays"])
        return _reply(msg, {k: v + 0.01 * (node + 1) if v.is_floating_point() else v for k, v in g.items()}, 10,
                      pid=node)

    with pytest.raises(RepnetError, match="round 2: the fedadam aggregate is non-finite") as e:
        server.run(FakeGrid([0, 1], answer))
    assert "\n" not in str(e.value)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["round"] == 1 and non_finite(ckpt) is None
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "results.json").exists()

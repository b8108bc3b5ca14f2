"""Measured training memory: what autograd really keeps, and the real peak of a step.

* :func:`measure_saved_bytes` - every tensor autograd saves for backward during one forward
  (saved-tensor hooks), de-duplicated by storage; parameters, buffers and the input excluded.
* :func:`measure_tensor_peak` - the exact peak of live tensor bytes over one steady-state training
  step (PyTorch's memory profiler and its timeline), with what was alive at that moment by kind.
* :func:`measure_peak_bytes` - the step's peak over what was resident: CUDA's allocator peak, or on
  CPU the RSS high-water mark of a fresh subprocess (coarse, secondary).

What each one includes and excludes: docs/memory.md, "How each figure is measured".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from repnet.optim import OPTIMIZER_STATE_BYTES, build_optimizer

__all__ = ["measure_saved_bytes", "measure_saved", "SavedReport", "measure_peak_bytes", "default_loss",
           "measure_tensor_peak", "OPTIMIZER_STATE_BYTES", "make_step_optimizer"]


def default_loss(out: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against ``target`` (or class 0) for logits; a plain sum otherwise."""
    if out.dim() == 2:
        if target is None:
            target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
        return nn.functional.cross_entropy(out, target)
    return out.float().sum()


def _storage_key(t: torch.Tensor) -> tuple[int, int, str]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes(), str(t.device)


@dataclass
class SavedReport:
    """What one forward kept for backward (bytes are storage bytes, each storage once)."""

    bytes: int = 0
    tensors: int = 0  # distinct storages counted
    excluded_bytes: int = 0  # parameters / buffers / input that were saved too (not counted)
    by_dtype: dict[str, int] = field(default_factory=dict)


def measure_saved(model: nn.Module, inputs, loss_fn=None, train: bool = True, backward: bool = True) -> SavedReport:
    """Run one forward of ``model(inputs)`` (train mode) and report the saved tensors."""
    inputs_t = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    excluded = {_storage_key(t)[0] for t in [*model.parameters(), *model.buffers(), *inputs_t]
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0}
    seen: dict[int, tuple[int, str, bool]] = {}
    keep_alive: list[torch.Tensor] = []  # storages stay allocated, so data_ptrs stay unique

    def pack(t: torch.Tensor):
        ptr, nbytes, _ = _storage_key(t)
        if ptr not in seen or nbytes > seen[ptr][0]:
            seen[ptr] = (nbytes, str(t.dtype), ptr in excluded)
            keep_alive.append(t)
        return t

    was_training = model.training
    model.train(train)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs_t)
        loss = (loss_fn or default_loss)(out)
        if backward and loss.requires_grad:
            loss.backward()
    finally:
        model.train(was_training)
    rep = SavedReport()
    for nbytes, dtype, excl in seen.values():
        if excl:
            rep.excluded_bytes += nbytes
        elif nbytes:
            rep.bytes += nbytes
            rep.tensors += 1
            rep.by_dtype[dtype] = rep.by_dtype.get(dtype, 0) + nbytes
    if backward:
        model.zero_grad(set_to_none=True)
    return rep


def measure_saved_bytes(model: nn.Module, inputs, loss_fn=None) -> int:
    """Bytes autograd keeps for backward during one training forward (see module doc)."""
    return measure_saved(model, inputs, loss_fn).bytes


# ----------------------------------------------------------------------------- peak
def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-3, optimizer: str = "adam"):
    opt = make_step_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, lr)
    out = model(x)
    loss = nn.functional.cross_entropy(out, y) if out.dim() == 2 else out.float().sum()
    if loss.requires_grad:
        loss.backward()
    if opt is not None:
        opt.step()
    return opt


def _cuda_peak(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: str = "adam") -> int:
    dev = x.device
    model.train()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    opt = _train_step(model, x, y, optimizer=optimizer)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    del opt
    model.zero_grad(set_to_none=True)
    return int(peak)


_CHILD = r"""
import json, sys
from repnet.memory.measure import child_main
print("REPNET_PEAK " + json.dumps(child_main(sys.stdin.buffer.read())))
"""


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child_main(data: bytes) -> dict:
    import gc
    import pickle

    # ``data`` is the parent's own pickle of the model, sent over a pipe (measure_peak_bytes)
    blob = pickle.loads(data)
    model, x, y = blob["model"], blob["x"], blob["y"]
    torch.set_num_threads(blob["threads"])
    model.train()
    # warm-up on a small batch (kernel / thread-pool initialisation), then forget it; two
    # samples, so that norms using batch statistics accept 1x1 feature maps
    xs, ys = x[:2], y[:2]
    out = model(xs)
    loss = nn.functional.cross_entropy(out, ys) if out.dim() == 2 else out.float().sum()
    if loss.requires_grad:
        loss.backward()
    del out, loss
    model.zero_grad(set_to_none=True)
    gc.collect()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        reset = False
    base = _proc_status("VmRSS")
    hwm0 = _proc_status("VmHWM")
    _train_step(model, x, y, optimizer=blob.get("optimizer", "adam"))
    hwm = _proc_status("VmHWM")
    if not reset and hwm <= hwm0:
        return {"peak_bytes": None, "baseline_rss": base, "hwm_reset": reset}
    return {"peak_bytes": int(hwm - base), "baseline_rss": int(base), "hwm_reset": reset}


def measure_peak_bytes(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                       threads: int | None = None, timeout: float = 900, optimizer: str = "adam") -> int | None:
    """Peak bytes of one training step beyond what was resident before it (module doc), with
    ``optimizer`` (``adam`` / ``sgd``, as :func:`measure_tensor_peak`).

    CUDA inputs: allocator peak in this process. CPU: peak RSS increase in a fresh
    subprocess (coarse). Returns ``None`` where it cannot be measured (no ``/proc``).
    """
    if targets is None:
        targets = torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device)
    if inputs.is_cuda:
        return _cuda_peak(model, inputs, targets, optimizer)
    if not os.path.exists("/proc/self/status"):
        return None
    import pickle

    data = pickle.dumps({"model": model, "x": inputs, "y": targets, "threads": threads or torch.get_num_threads(),
                         "optimizer": optimizer})
    # the child sees the same import path, so classes defined next to the caller unpickle
    path_env = os.pathsep.join(p for p in sys.path if p)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=path_env)
    r = subprocess.run([sys.executable, "-c", _CHILD], input=data, capture_output=True, env=env, timeout=timeout)
    stdout, stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    for line in stdout.splitlines():
        if line.startswith("REPNET_PEAK "):
            return json.loads(line[len("REPNET_PEAK "):])["peak_bytes"]
    raise RuntimeError(f"peak-memory subprocess failed (exit {r.returncode}):\n{stderr[-2000:]}")


# ----------------------------------------------------------------------------- exact tensor peak
class _quiet_stderr:
    """The profiler's C++ side logs start / stop (and a missing GPU) straight to file descriptor 2."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


#: bytes per trainable parameter beyond its weight that a step of each optimizer holds: the
#: gradient (4 B) and the state (Adam: two moments; SGD with momentum: one buffer)
def make_step_optimizer(params: list, optimizer: str = "adam", lr: float = 1e-3):
    """The optimizer a measured step uses (:func:`build_optimizer`, no weight decay); None without parameters."""
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
    return build_optimizer(optimizer, params, lr) if params else None


def measure_tensor_peak(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                        lr: float = 1e-3, optimizer: str = "adam") -> dict:
    """Peak live tensor bytes of one steady-state training step (module doc), in bytes.

    Returns ``peak_bytes`` (everything alive at the peak, the input batch included),
    ``input_bytes`` (the batch), ``by_kind`` (PyTorch's categories at that moment) and
    ``breakdown``: ``frozen_weights`` (frozen parameters and every buffer: 8-bit codes, scales,
    norm statistics - resident, known exactly from the model), ``trainable_state`` (trained
    weights + their gradients + optimizer state), ``forward_activations`` (PyTorch's "activation":
    tensors the forward made - at a forward peak the layer's input and output and what is kept,
    at a backward peak what is still kept), ``input`` (the batch) and ``transient`` (the rest:
    backward buffers, temporaries). The model's gradients are cleared afterwards and its state is
    as before."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_step_optimizer(params, optimizer, lr)
    was = model.training
    model.train()
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def step():
        out = model(x)
        loss = nn.functional.cross_entropy(out, y) if out.dim() == 2 and y is not None else out.float().sum()
        if loss.requires_grad:
            loss.backward()
        del out, loss  # as a training loop's next iteration would
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    try:
        step()  # creates the optimizer state: the profiled step is a steady-state one
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
        with _quiet_stderr(), profile(activities=activities, profile_memory=True, record_shapes=True,
                                      with_stack=True) as prof:
            step()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(
            f"cuda:{x.device.index or 0}" if x.is_cuda else "cpu")
    finally:
        model.load_state_dict(saved)  # the two steps change nothing the caller sees
        model.zero_grad(set_to_none=True)
        model.train(was)
    totals = [sum(row) for row in sizes]
    k = max(range(len(totals)), key=totals.__getitem__) if totals else 0
    names = {c: ("unknown" if c is None else c.name.lower()) for c in _CATEGORY_TO_INDEX}
    by_kind = {names[c]: int(sizes[k][i + 1]) for c, i in _CATEGORY_TO_INDEX.items()} if totals else {}
    peak = int(totals[k]) if totals else 0
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    frozen = nbytes(p for p in model.parameters() if not p.requires_grad) + nbytes(model.buffers())
    # weights and the batch are known exactly; PyTorch's categories give the rest (its "parameter"
    # also holds frozen parameters, its "input" the buffers and the batch)
    trainable = nbytes(params) + by_kind.get("gradient", 0) + by_kind.get("optimizer_state", 0)
    act = by_kind.get("activation", 0)
    inp = x.numel() * x.element_size()
    breakdown = {"frozen_weights": frozen, "trainable_state": trainable, "forward_activations": act, "input": inp,
                 "transient": max(0, peak - frozen - trainable - act - inp)}
    return {"peak_bytes": peak, "input_bytes": inp, "by_kind": by_kind, "breakdown": breakdown,
            "frozen_weight_bytes": frozen, "trainable_weight_bytes": nbytes(params)}

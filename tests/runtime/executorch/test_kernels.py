"""repnet's own ExecuTorch kernels (device/kernels, repnet.runtime.executorch.kernels): every C++ kernel equals
its PyTorch reference on the runtime, each graph pass moves what it says onto them and keeps the
gradients (against eager PyTorch and the portable program), the runtime refuses a program whose
kernels are not loaded in one line, and the library stays int8 at rest."""
import collections
import functools

import pytest
import torch
from torch import nn

pytest.importorskip("executorch")

from executorch.exir import to_edge  # noqa: E402
from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer  # noqa: E402
from executorch.extension.training import _load_for_executorch_for_training_from_buffer  # noqa: E402

from repnet import RepnetError  # noqa: E402
from repnet.runtime.executorch import kernels as ek  # noqa: E402
from repnet.runtime.executorch.trainer import RuntimeTrainer
from repnet.runtime.executorch.program import TrainStep, export_training_program  # noqa: E402
from repnet.memory.quant import quantize_frozen_weights  # noqa: E402

ops = torch.ops.repnet

if not ek.library_path().is_file():
    pytest.skip(f"{ek.library_path()} is not built (bash scripts/setup.sh)", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def _kernels():
    ek.load_kernels()
    ek.set_runtime_threads(1)


def _op_counts(buffer: bytes) -> collections.Counter:
    """How many times the program calls each operator."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import KernelCall

    plan = deserialize_pte_binary(buffer).program.execution_plan[0]
    return collections.Counter(plan.operators[i.instr_args.op_index].name for chain in plan.chains
                               for i in chain.instructions if isinstance(i.instr_args, KernelCall))


def _program_ops(buffer: bytes) -> set[str]:
    return set(_op_counts(buffer))


def _ops_on_maps(buffer: bytes) -> set[str]:
    """The operators that read or write an activation map or its gradient (a 4-D tensor, H x W > 1)."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import KernelCall, Tensor

    plan = deserialize_pte_binary(buffer).program.execution_plan[0]
    out = set()
    for chain in plan.chains:
        for ins in chain.instructions:
            a = ins.instr_args
            vals = [plan.values[i].val for i in a.args] if isinstance(a, KernelCall) else []
            if any(isinstance(v, Tensor) and len(v.sizes) == 4 and v.sizes[2] * v.sizes[3] > 1 for v in vals):
                out.add(plan.operators[a.op_index].name)
    return out


# ----------------------------------------------------------------------------- the kernels themselves
def _q(co, cig, k, g):
    return torch.randint(-127, 128, (co, cig, k, k), dtype=torch.int8, generator=g)


def _cases():
    """(name, op, args): tensors become program inputs, the rest constants of the program."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    pos = lambda *s: torch.rand(*s, generator=g) + 0.5  # noqa: E731
    bits = lambda n: torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)  # noqa: E731
    no = ek.NO_BOUND
    cases = []
    # forward: (input, weight, scale, bias, stride, padding, groups, bn?, act)
    for name, (n, ci, h, w, co, k, s, p, grp, quant, bn, act) in {
        "pointwise int8 + bn + relu6": (2, 16, 6, 5, 24, 1, 1, 0, 1, True, True, (0.0, 6.0)),
        "pointwise fp32 + bias": (2, 5, 4, 4, 7, 1, 1, 0, 1, False, False, (-no, no)),
        "stem 3x3 s2 int8 + bn + relu6": (2, 3, 17, 16, 8, 3, 2, 1, 1, True, True, (0.0, 6.0)),
        "full 5x5 groups 2 fp32 + relu": (2, 6, 11, 10, 8, 5, 1, 2, 2, False, False, (0.0, no)),
        "depthwise 3x3 s1 int8 + bn + relu6": (2, 6, 13, 20, 6, 3, 1, 1, 6, True, True, (0.0, 6.0)),
        "depthwise 3x3 s2 int8 + bn": (2, 6, 14, 19, 6, 3, 2, 1, 6, True, True, (-no, no)),
        "depthwise 5x5 s2 int8": (1, 4, 23, 22, 4, 5, 2, 2, 4, True, False, (-no, no)),
        "depthwise 7x7 s1 int8 + relu6": (1, 3, 9, 40, 3, 7, 1, 3, 3, True, False, (0.0, 6.0)),
        "depthwise 2x2 s2 (an average pool)": (2, 3, 8, 8, 3, 2, 2, 0, 3, False, False, (-no, no)),
    }.items():
        x = r(n, ci, h, w)
        wt = _q(co, ci // grp, k, g) if quant else r(co, ci // grp, k, k)
        scale = pos(co) * 0.01 if quant else None
        bias = r(co) if "bias" in name else None
        bnp = [pos(co), r(co), r(co), pos(co)] if bn else [None] * 4
        cases.append((f"conv2d {name}", ops.conv2d.default,
                      (x, wt, scale, bias, [s, s], [p, p], [1, 1], grp, *bnp, 1e-5, *act)))
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if (ho * wo) % 8 == 0:
            cases.append((f"conv2d_mask {name}", ops.conv2d_mask.default,
                          (x, wt, scale, bias, [s, s], [p, p], [1, 1], grp, *bnp, 1e-5, *act, act[0], act[1])))
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        go = r(n, co, ho, wo)
        mask = bits(n * ci * h * w // 8) if (n * ci * h * w) % 8 == 0 else None
        gscale = pos(co) if quant else None
        cases.append((f"conv2d_input_grad {name}", ops.conv2d_input_grad.default,
                      (go, wt, scale, gscale, mask, [n, ci, h, w], [s, s], [p, p], [1, 1], grp)))
        if not quant:
            cases.append((f"conv2d_weight_grad {name}", ops.conv2d_weight_grad.default,
                          (go, x, list(wt.shape), [s, s], [p, p], [1, 1], grp)))
    x = r(2, 4, 6, 8) * 4 + 2
    cases += [("mask_outside relu6", ops.mask_outside.default, (x, 0.0, 6.0)),
              ("mask_outside relu", ops.mask_outside.default, (x, 0.0, no)),
              ("mask_fill", ops.mask_fill.default, (x, bits(48), 0.0)),
              ("channel_sum", ops.channel_sum.default, (r(3, 5, 7, 9),)),
              ("resize_bilinear up", ops.resize_bilinear.default, (r(2, 3, 5, 7), [9, 13], False)),
              ("resize_bilinear down, corners", ops.resize_bilinear.default, (r(2, 3, 9, 8), [4, 5], True)),
              ("resize_bilinear_backward", ops.resize_bilinear_backward.default, (r(2, 3, 9, 13), [2, 3, 5, 7], False)),
              ("resize_bilinear_backward corners", ops.resize_bilinear_backward.default,
               (r(2, 3, 4, 5), [2, 3, 9, 8], True))]
    return cases


class _Calls(nn.Module):
    def __init__(self, cases):
        super().__init__()
        self.cases = cases

    def forward(self, *tensors):
        it, outs = iter(tensors), []
        for _, op, args in self.cases:
            out = op(*[next(it) if isinstance(a, torch.Tensor) else a for a in args])
            outs.extend(out if isinstance(out, tuple) else (out,))
        return tuple(outs)


def test_every_kernel_equals_its_pytorch_reference_on_the_runtime():
    """One program calls every kernel path (1x1, stem, grouped 5x5, depthwise 3x3 / 5x5 / 7x7 at strides 1 and
    2, int8 and fp32 weights, fused batch norm + clamp, masks, grad scales, resize): the runtime's outputs equal
    the ops' PyTorch reference implementations (eager CPU)."""
    cases = _cases()
    inputs = tuple(a for _, _, args in cases for a in args if isinstance(a, torch.Tensor))
    ep = torch.export.export(_Calls(cases), inputs, strict=False)
    prog = to_edge(ep).to_executorch()
    assert {f"{n}.out" for n in _program_ops(prog.buffer)} >= set(ek.kernel_ops())
    mod = _load_for_executorch_from_buffer(prog.buffer)
    outs = mod.forward(inputs)
    ek.set_runtime_threads(2)  # the same results on two threads (tiles split differently)
    try:
        for a, b in zip(outs, mod.forward(inputs)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    finally:
        ek.set_runtime_threads(1)
    got = iter(outs)
    for name, op, args in cases:
        refs = op(*args)  # the CPU reference (repnet.runtime.executorch.kernels)
        for ref in refs if isinstance(refs, tuple) else (refs,):
            out = next(got)
            assert out.shape == ref.shape and out.dtype == ref.dtype, name
            if ref.dtype == torch.uint8:
                assert torch.equal(out, ref), name
            else:
                scale = float(ref.abs().max()) or 1.0
                assert float((out - ref).abs().max()) <= 1e-5 * scale, name


def test_reference_ops_equal_plain_pytorch():
    """The reference implementations themselves: conv2d = dequantise + conv + eval batch norm + clamp; the input
    gradient = autograd's through the same conv (grad scale, then mask); masks = pack_masks' layout."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 9, 9, generator=g, requires_grad=True)
    codes = torch.randint(-127, 128, (8, 1, 3, 3), dtype=torch.int8, generator=g)
    scale = torch.rand(8, generator=g) * 0.01 + 0.001
    bn = nn.BatchNorm2d(8).eval()
    bn.running_mean.normal_(generator=g)
    bn.running_var.uniform_(0.5, 2.0, generator=g)
    w = codes.float() * scale.view(-1, 1, 1, 1)
    ref = torch.nn.functional.hardtanh(bn(torch.nn.functional.conv2d(x, w, None, 2, 1, 1, 8)), 0.0, 6.0)
    out = ops.conv2d(x, codes, scale, None, [2, 2], [1, 1], [1, 1], 8, bn.weight, bn.bias, bn.running_mean,
                     bn.running_var, 1e-5, 0.0, 6.0)
    torch.testing.assert_close(out, ref)
    gy = torch.randn(ref.shape, generator=g)
    a = torch.rand(8, generator=g) + 0.5
    (gx,) = torch.autograd.grad(torch.nn.functional.conv2d(x, w, None, 2, 1, 1, 8), x, gy * a.view(1, -1, 1, 1))
    m = torch.rand(x.shape, generator=g) > 0.5
    codes_m = ek.pack_bits(m)
    assert torch.equal(ek.unpack_bits(codes_m, x.shape), m)
    # byte j, bit i = element 8j + i
    assert int(codes_m[0]) == sum(1 << i for i in range(8) if m.reshape(-1)[i])
    got = ops.conv2d_input_grad(gy, codes, scale, a, codes_m, list(x.shape), [2, 2], [1, 1], [1, 1], 8)
    torch.testing.assert_close(got, gx.masked_fill(m, 0.0))
    y = torch.randn(4, 8, generator=g) * 5
    assert torch.equal(ek.unpack_bits(ops.mask_outside(y, 0.0, 6.0), y.shape), (y <= 0) | (y >= 6))


# ----------------------------------------------------------------------------- the passes
class Block(nn.Module):
    """What the backbones are made of: a trainable conv, then frozen (8-bit) pointwise conv + BN + ReLU6,
    depthwise conv stride 2 + BN + ReLU6, pointwise conv + BN (its bias trains), a ReLU, the head."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(3, 8, 3, padding=1)
        self.frozen = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                                    nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False), nn.BatchNorm2d(16),
                                    nn.ReLU6(), nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.frozen.requires_grad_(False)
        self.frozen[7].bias.requires_grad_(True)
        self.head = nn.Linear(8, 4)
        for m in self.frozen:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
        quantize_frozen_weights(self, "linear", engine=False)

    def forward(self, x):
        return self.head(self.frozen(self.side(x)).mean((2, 3)))


class Module(nn.Module):
    """Rep-Net's module pattern: the image average-pooled, a trainable 5x5 conv (2 groups), GroupNorm, ReLU, a
    1x1 conv, resized back (bilinear) and added to a frozen conv's output."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6())
        self.frozen.requires_grad_(False)
        self.conv1 = nn.Conv2d(3, 8, 5, padding=2, bias=False)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 1, groups=2, bias=False)
        self.head = nn.Linear(8, 4)
        quantize_frozen_weights(self, "linear", engine=False)

    def forward(self, x):
        p = self.conv2(torch.relu(self.norm(self.conv1(nn.functional.avg_pool2d(x, 2)))))
        p = nn.functional.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head((self.frozen(x) + p).mean((2, 3)))


def _step(model, prog, batch=2, size=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 4, (batch,), generator=g)
    mod = _load_for_executorch_for_training_from_buffer(prog.buffer)
    loss, logits = mod.forward_backward("forward", (x, y))
    return x, y, loss, logits, dict(mod.named_gradients())


def _close(got, ref, what):
    scale = max(float(ref.abs().max()), 1e-12)
    assert float((got - ref).abs().max()) <= 1e-5 * scale + 1e-7, what


def _equal_eager_and_portable(model, prog, portable, size=16):
    """loss, logits and every trained gradient equal eager PyTorch's (same dequantised weights) and the portable
    program's, within 1e-5 of each tensor's largest magnitude"""
    x, y, loss, logits, grads = _step(model, prog, size=size)
    *_, p_loss, p_logits, p_grads = _step(model, portable, size=size)
    model.zero_grad()
    ref_loss, ref_logits = TrainStep(model).eval()(x, y)
    ref_loss.backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(prog.trainable) == sorted(trained) == sorted(portable.trainable)
    for got, ref, what in ((loss, ref_loss.detach(), "loss"), (logits, ref_logits, "logits"),
                           (loss, p_loss, "loss vs portable"), (logits, p_logits, "logits vs portable")):
        _close(got, ref, what)
    for n in trained:
        _close(grads[f"model.{n}"], model.get_parameter(n).grad, n)
        _close(grads[f"model.{n}"], p_grads[f"model.{n}"], f"{n} vs portable")


def _without(name):
    return tuple(p for p in ek.KERNEL_PASSES if p != name)


@functools.lru_cache(maxsize=1)
def _block_programs():
    """Block (seed 0), its program on our kernels and its portable program (exported once for the tests)."""
    torch.manual_seed(0)
    model = Block().eval()
    return model, export_training_program(model, 2, 16), export_training_program(model, 2, 16, kernels=False)


def test_kernel_passes_leave_no_portable_conv_norm_or_mask_op():
    model, prog, portable = _block_programs()
    assert prog.kernels and not portable.kernels
    r = prog.rewrites
    # 4 forward convs, 3 frozen input gradients, the trained conv's backward (its input needs no gradient); the
    # 3 batch norms fused into their convs, and their backward scales into the input gradients below them
    assert r["kernel_conv"] == 8 and r["kernel_bn_act"] == 3 and r["kernel_grad_scale"] == 3
    # 3 masks made (two ReLU6, one ReLU) and applied: the ReLU6 ones inside input gradients, the ReLU's apart
    assert r["kernel_masks"] == 6 and _op_counts(prog.buffer)["repnet::mask_fill"] == 1
    assert r["kernel_sums"] == 1  # the trained BN bias's gradient (the trained conv's bias: its backward's)
    assert r["kernel_conv_mask"] == 3  # every mask is made by the conv before it, in its epilogue
    # what touches an activation map: our kernels, and the global pool (mean; its backward: expand, div) only
    assert _ops_on_maps(prog.buffer) == {"repnet::conv2d", "repnet::conv2d_mask", "repnet::conv2d_input_grad",
                                         "repnet::conv2d_weight_grad", "repnet::mask_fill", "repnet::channel_sum",
                                         "aten::mean", "aten::expand_copy", "aten::div"}
    assert {"aten::convolution", "aten::_native_batch_norm_legit_no_training", "aten::hardtanh", "aten::where",
            "aten::le", "aten::ge", "aten::relu"} <= _ops_on_maps(portable.buffer)
    # no int8 weight is cast to float in the graph (the one cast left: the loss's count of targets)
    assert _op_counts(prog.buffer)["dim_order_ops::_to_dim_order_copy"] == 1
    _equal_eager_and_portable(model, prog, portable)
    assert prog.planned_bytes <= 1.05 * portable.planned_bytes  # (the bar; 224 px: benchmarks/device_speed.py)


@pytest.mark.parametrize("name,left", [
    ("kernel_bn_act", "aten::_native_batch_norm_legit_no_training"),
    ("kernel_masks", "aten::where"),
    ("kernel_conv_mask", "repnet::mask_outside"),
    ("kernel_grad_scale", "aten::mul"),
    ("kernel_sums", "aten::sum"),
])
def test_each_pass_keeps_the_gradients(name, left):
    """Without one pass its ops stay portable, and the gradients are the same."""
    model, full, portable = _block_programs()
    prog = export_training_program(model, 2, 16, kernels=_without(name))
    assert name not in prog.rewrites and _op_counts(prog.buffer)[left] > _op_counts(full.buffer)[left]
    _equal_eager_and_portable(model, prog, portable)


def test_resize_and_average_pool_run_on_our_kernels():
    torch.manual_seed(0)
    model = Module().eval()
    with torch.no_grad():
        model.norm.weight.normal_(1, 0.1)
    prog = export_training_program(model, 2, 16)
    portable = export_training_program(model, 2, 16, kernels=False)
    assert prog.rewrites["kernel_resize"] == 1 and prog.rewrites["kernel_avg_pool"] == 1
    names = _ops_on_maps(prog.buffer)
    assert {"repnet::resize_bilinear", "repnet::resize_bilinear_backward"} <= names
    assert not names & {"aten::index", "aten::index_put", "aten::avg_pool2d", "aten::convolution"}
    assert {"aten::index_put"} <= set(_program_ops(portable.buffer))  # export's own decomposition
    _equal_eager_and_portable(model, prog, portable)
    without = export_training_program(model, 2, 16, kernels=_without("kernel_resize"))
    assert "kernel_resize" not in without.rewrites and "aten::index_put" in set(_program_ops(without.buffer))


# ----------------------------------------------------------------------------- loading
def test_a_program_on_our_kernels_needs_the_library(monkeypatch, tmp_path):
    model, prog, portable = _block_programs()
    monkeypatch.setenv(ek.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(RepnetError, match="is not built") as e:
        RuntimeTrainer(model, prog, lr=0.01, lr_side=0.01)
    assert "\n" not in str(e.value) and "--portable" in str(e.value)
    RuntimeTrainer(model, portable, lr=0.01, lr_side=0.01)  # the portable program needs nothing of ours
    monkeypatch.delenv(ek.LIBRARY_ENV)
    assert ek.load_kernels() == len(ek.kernel_ops())  # (already loaded: the count it registered)


def test_unknown_kernel_pass_is_refused():
    with pytest.raises(RepnetError, match="unknown kernel pass"):
        export_training_program(Block().eval(), 2, 16, kernels=("kernel_conv", "kernel_everything"))


def test_frozen_weights_stay_int8_in_the_program():
    """The program's constants are the int8 codes and scales (as the portable program's), and no float tensor of a
    frozen weight's shape is made: the kernels dequantise tiles as they go (the portable program plans one)."""
    model, prog, portable = _block_programs()
    assert prog.weights_bytes == portable.weights_bytes
    assert len(prog.buffer) <= len(portable.buffer)  # the same constants, fewer instructions (no file growth)
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import Tensor

    frozen = {tuple(m.weight_codes.shape) for m in model.modules() if hasattr(m, "weight_codes")}

    def float_weight_shaped(buffer):
        plan = deserialize_pte_binary(buffer).program.execution_plan[0]
        return [v.val.sizes for v in plan.values if isinstance(v.val, Tensor) and v.val.scalar_type == 6  # float
                and tuple(v.val.sizes) in frozen and v.val.allocation_info is not None]

    assert float_weight_shaped(portable.buffer) and not float_weight_shaped(prog.buffer)

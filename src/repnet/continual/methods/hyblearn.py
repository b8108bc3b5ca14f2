"""Hyb-Learn: per task, freeze the backbone tiles most correlated with earlier tasks; retrain the rest.

Hyb-Learn (Zhang, Yang, Fan, DAC 2024) does continual learning on a hybrid in-memory-computing chip:
a tile (a processing element: ``tile`` output channels of a backbone conv, with its norm's scale and
shift) whose weights the earlier tasks rely on stays frozen in RRAM, the rest is retrained in SRAM.
Before each task every tile is scored by the share of the new task's gradient that falls in the old
tasks' input subspace (GPM-style patch covariances); the most correlated tiles are frozen up to
``freeze_ratio``, ``select=random`` is the ablation, ``ssl_epochs`` adds a SimSiam warm-up. The score
exactly, and every choice made where the papers' abstracts are silent: docs/continual.md, "How
Hyb-Learn scores and freezes tiles".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from repnet.errors import RepnetError
from repnet.methods.base import AT_LEAST_ONE, NON_NEGATIVE, MethodOptions, opt
from repnet.continual.methods import CONTINUAL_METHODS

OPEN_FRACTION = (lambda v: 0 < v < 1, "in (0, 1)")
CLOSED_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")


@dataclass
class HybLearnOptions(MethodOptions):
    bn: str = opt("frozen", "backbone norm statistics: fixed (batch statistics would change what every frozen "
                  "tile computes)", ("frozen",))
    freeze_ratio: float = opt(0.8, "fraction of the tiled backbone weights frozen for each new task (RRAM)",
                              check=CLOSED_FRACTION)
    tile: int = opt(64, "processing element: output channels per crossbar tile", check=AT_LEAST_ONE)
    energy: float = opt(0.97, "share of the old tasks' input-representation energy their subspace keeps (GPM)",
                        check=OPEN_FRACTION)
    score_batches: int = opt(4, "batches for the tile scores and for each task's representation",
                             check=AT_LEAST_ONE)
    ssl_epochs: int = opt(0, "self-supervised (SimSiam) warm-up epochs on the new task's images", check=NON_NEGATIVE)
    select: str = opt("correlation", "which tiles freeze: the most correlated (Hyb-Learn), or random ones at the "
                      "same ratio (the ablation that shows what the score buys)", ("correlation", "random"))


# ----------------------------------------------------------------------------- tiles
@dataclass(frozen=True)
class Tile:
    layer: str   # the convolution's name in the backbone
    start: int   # output channels [start, stop)
    stop: int
    size: int    # weight elements (conv rows + norm affine)


def tiled_layers(backbone: nn.Module) -> dict[str, tuple[nn.Conv2d, nn.Module | None]]:
    """Every convolution of ``backbone`` with the norm that directly follows it (module order)."""
    mods = list(backbone.named_modules())
    out = {}
    for i, (name, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            nxt = mods[i + 1][1] if i + 1 < len(mods) else None
            norm = nxt if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.num_features == m.out_channels \
                else None
            out[name] = (m, norm)
    return out


def make_tiles(backbone: nn.Module, tile: int) -> list[Tile]:
    tiles = []
    for name, (conv, norm) in tiled_layers(backbone).items():
        row = conv.weight[0].numel() + (2 if norm is not None and norm.affine else 0)
        for s in range(0, conv.out_channels, tile):
            e = min(s + tile, conv.out_channels)
            tiles.append(Tile(name, s, e, row * (e - s)))
    return tiles


# ----------------------------------------------------------------------------- representations
def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Receptive fields of ``x`` for ``conv``: ``(groups, d, n)`` (d = Cin/groups * k * k)."""
    g = conv.groups
    if conv.kernel_size == (1, 1) and conv.padding in ((0, 0), 0) and conv.stride == (1, 1):
        p = x.flatten(2)  # (N, Cin, L)
    else:
        p = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, Cin*k*k, L)
    n, cd, length = p.shape
    return p.reshape(n, g, cd // g, length).permute(1, 2, 0, 3).reshape(g, cd // g, n * length)


@torch.no_grad()
def input_covariances(model: nn.Module, backbone: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Per convolution of ``backbone``: the mean patch outer product ``(groups, d, d)`` of its inputs
    over ``batches`` (images) run through ``model`` in eval mode."""
    layers = tiled_layers(backbone)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(conv, args):
            x = args[0].detach().float()
            for i in range(x.shape[0]):  # one image at a time: unfold of a whole batch is large at 224 px
                p = _patches(conv, x[i:i + 1])
                c = torch.einsum("gdn,gen->gde", p, p)
                sums[name] = c if name not in sums else sums[name] + c
                counts[name] = counts.get(name, 0) + p.shape[-1]
        return fn

    handles = [conv.register_forward_pre_hook(hook(n)) for n, (conv, _) in layers.items()]
    was = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {n: sums[n] / max(counts[n], 1) for n in sums}


def accumulate(total: dict[str, torch.Tensor] | None, covs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``total + covs / tr(covs)`` per layer and group: the old tasks' summed representation."""
    out = dict(total or {})
    for name, c in covs.items():
        c = c / c.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
        out[name] = c if name not in out else out[name] + c
    return out


def old_subspaces(total: dict[str, torch.Tensor], energy: float) -> dict[str, torch.Tensor]:
    """Per layer: ``(groups, d, d)`` eigenvectors of the old tasks' summed covariance, with the
    columns beyond ``energy`` of the spectrum zeroed (so ``U U^T`` is the projector)."""
    out = {}
    for name, c in total.items():
        vals, vecs = torch.linalg.eigh(c.double())  # ascending
        vals, vecs = vals.flip(-1).clamp_min(0), vecs.flip(-1)
        share = vals.cumsum(-1) / vals.sum(-1, keepdim=True).clamp_min(1e-300)
        keep = torch.cat([torch.ones_like(share[:, :1], dtype=torch.bool), share[:, :-1] < energy], dim=1)
        out[name] = (vecs * keep[:, None, :]).float()
    return out


def tile_scores(model: nn.Module, backbone: nn.Module, batches, subspaces: dict[str, torch.Tensor],
                tiles: list[Tile]) -> list[float]:
    """The correlation ratio of every tile (docs/continual.md) from the gradients of ``batches``
    (``(x, y)`` pairs) of the supervised loss through ``model``."""
    layers = tiled_layers(backbone)
    weights = {n: conv.weight for n, (conv, _) in layers.items()}
    saved = {n: w.requires_grad for n, w in weights.items()}
    proj = {n: torch.zeros(w.shape[0], dtype=torch.float64) for n, w in weights.items()}
    tot = {n: torch.zeros(w.shape[0], dtype=torch.float64) for n, w in weights.items()}
    was = model.training
    model.train()
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for x, y in batches:
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(weights.values()), allow_unused=True)
            for (n, w), g in zip(weights.items(), grads):
                if g is None:
                    continue
                conv = layers[n][0]
                rows = g.detach().reshape(conv.groups, w.shape[0] // conv.groups, -1)      # (G, O/G, d)
                inside = torch.einsum("god,gde->goe", rows, subspaces[n].to(rows))        # coefficients in U
                proj[n] += inside.pow(2).sum(-1).reshape(-1).double().cpu()
                tot[n] += rows.pow(2).sum(-1).reshape(-1).double().cpu()
    finally:
        for n, w in weights.items():
            w.requires_grad_(saved[n])
        model.train(was)
    scores = []
    for t in tiles:
        e = float(tot[t.layer][t.start:t.stop].sum())
        scores.append(float(proj[t.layer][t.start:t.stop].sum()) / e if e > 0 else 1.0)
    return scores


def choose_frozen(tiles: list[Tile], scores: list[float], freeze_ratio: float) -> list[bool]:
    """Freeze tiles in decreasing score (ties: model order) until ``freeze_ratio`` of the tiled weights."""
    order = sorted(range(len(tiles)), key=lambda i: (-scores[i], i))
    target = freeze_ratio * sum(t.size for t in tiles)
    frozen, done = [False] * len(tiles), 0
    for i in order:
        if done >= target:
            break
        frozen[i], done = True, done + tiles[i].size
    return frozen


# ----------------------------------------------------------------------------- freezing
class TileFreeze:
    """Train only the retrained tiles of ``backbone``: gradient rows of frozen tiles are zeroed
    (with Adam / SGD and no weight decay their values stay bit for bit), tensors with no retrained
    row stop requiring grad (so the memory engine keeps nothing for them), tensors in no tile are
    frozen. :meth:`release` undoes it."""

    def __init__(self, backbone: nn.Module, tiles: list[Tile], frozen: list[bool]):
        self.backbone = backbone
        self.handles = []
        layers = tiled_layers(backbone)
        live: dict[str, torch.Tensor] = {}
        for t, f in zip(tiles, frozen):
            conv = layers[t.layer][0]
            m = live.setdefault(t.layer, torch.zeros(conv.out_channels, dtype=torch.bool))
            m[t.start:t.stop] = not f
        tiled = set()
        for name, (conv, norm) in layers.items():
            mask = live.get(name, torch.zeros(conv.out_channels, dtype=torch.bool))
            for p in [conv.weight, *([conv.bias] if conv.bias is not None else []),
                      *([norm.weight, norm.bias] if norm is not None and norm.affine else [])]:
                tiled.add(id(p))
                p.requires_grad_(bool(mask.any()))
                if mask.any() and not mask.all():
                    shape = (-1,) + (1,) * (p.dim() - 1)
                    keep = mask.to(p.device, p.dtype).reshape(shape)
                    self.handles.append(p.register_hook(lambda g, keep=keep: g * keep))
        for p in backbone.parameters():
            if id(p) not in tiled:
                p.requires_grad_(False)

    def release(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for p in self.backbone.parameters():
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- self-supervised warm-up
def two_views(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random views of a batch: resized crop (scale 0.5-1) and brightness / contrast jitter."""
    views = []
    n, _, h, w = x.shape
    for _ in range(2):
        out = []
        for i in range(n):
            r = torch.rand(5, generator=generator).tolist()
            s = 0.5 + 0.5 * r[0]
            ch, cw = max(1, round(h * s ** 0.5)), max(1, round(w * s ** 0.5))
            top, left = int(r[1] * (h - ch + 1)), int(r[2] * (w - cw + 1))
            crop = F.interpolate(x[i:i + 1, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                                 align_corners=False)
            mean = crop.mean()
            out.append((crop - mean) * (0.6 + 0.8 * r[3]) + mean + (r[4] - 0.5) * 0.8)
        views.append(torch.cat(out))
    return views[0], views[1]


class SimSiam(nn.Module):
    """SimSiam (Chen & He 2021) heads on a task model's pre-logit features."""

    def __init__(self, task_model: nn.Module, dim: int = 256, pred: int = 64, seed: int = 0):
        super().__init__()
        self.task_model = task_model
        f = task_model.backbone.num_features
        self.projector = nn.Sequential(nn.Linear(f, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                                       nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False))
        self.predictor = nn.Sequential(nn.Linear(dim, pred, bias=False), nn.BatchNorm1d(pred), nn.ReLU(inplace=True),
                                       nn.Linear(pred, dim))
        self.generator = torch.Generator().manual_seed(seed)

    def train(self, mode: bool = True):
        super().train(mode)
        self.task_model.train(mode)  # keeps the backbone's norms frozen
        return self

    def features(self, x):
        bb = self.task_model.backbone
        return bb.forward_pre_logits(bb.forward_features(x))

    def objective(self, x: torch.Tensor, y: torch.Tensor):
        a, b = two_views(x, self.generator)
        za, zb = self.projector(self.features(a)), self.projector(self.features(b))
        pa, pb = self.predictor(za), self.predictor(zb)
        loss = -(F.cosine_similarity(pa, zb.detach()).mean() + F.cosine_similarity(pb, za.detach()).mean()) / 2
        return loss, None


# ----------------------------------------------------------------------------- the per-task driver
@CONTINUAL_METHODS.register("hyblearn", help="Hyb-Learn (DAC 2024): per task, freeze the backbone tiles most "
                            "correlated with earlier tasks, retrain the rest")
class HybLearn:
    """The continual method ``hyblearn`` (a driver of :func:`repnet.continual.train_sequence`).

    :meth:`task_model` says what model each task gets (``full`` with frozen norm statistics, on
    the shared backbone) and refuses settings it cannot honour; :meth:`before_task` scores the
    tiles, freezes the most correlated ones and runs the optional warm-up; :meth:`after_task`
    releases them, measures what was written and adds the task's representation to the old tasks'
    subspace. The summed representation is the only state between tasks (:meth:`state` /
    :meth:`load_state`)."""

    Options = HybLearnOptions
    policy = ("Hyb-Learn: per task, the backbone tiles most correlated with earlier tasks frozen, the rest "
              "retrained in place; a head per task")

    @staticmethod
    def task_model(options: HybLearnOptions, cfg, naive: bool) -> tuple[str, dict]:
        """``(method, options)`` of every task's model; one-line refusals of what cannot combine."""
        if naive:
            raise RepnetError("hyblearn decides itself which backbone tensors train; it does not combine with naive")
        if cfg.int8:
            raise RepnetError("hyblearn retrains backbone tiles in fp32; it does not combine with int8")
        if cfg.weight_decay:
            raise RepnetError("hyblearn needs weight_decay=0 (decay would move the frozen tiles)")
        return "full", {"bn": options.bn, "dropout": options.dropout}

    @staticmethod
    def summary(record: dict) -> str:
        return (f"hyblearn: {record['tiles_frozen']}/{record['tiles']} tiles frozen "
                f"({record['freeze_ratio']:.1%} of the tiled weights); the rest retrains")

    def __init__(self, options: HybLearnOptions, backbone: nn.Module):
        self.options = options
        self.backbone = backbone
        self.tiles = make_tiles(backbone, options.tile)
        self.total: dict[str, torch.Tensor] | None = None
        self._freeze: TileFreeze | None = None

    def _batches(self, ds, batch_size: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``score_batches`` batches of ``ds``, items spread evenly over it (the same every run)."""
        n = min(len(ds), self.options.score_batches * batch_size)
        idx = sorted({round(i * (len(ds) - 1) / max(n - 1, 1)) for i in range(n)})
        items = [ds[i] for i in idx]
        xs, ys = torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])
        return [(xs[j:j + batch_size].to(device), ys[j:j + batch_size].to(device))
                for j in range(0, len(idx), batch_size)]

    def before_task(self, task_model: nn.Module, train_ds, cfg, device, seed: int, name: str) -> dict:
        from repnet.memory.measure import measure_saved_bytes

        self._data = self._batches(train_ds, cfg.batch_size, device)
        images = [x for x, _ in self._data]
        if self.total is None:  # the prior task: the pretrained model, seen through the first task's images
            self.total = accumulate(None, input_covariances(task_model, self.backbone, images))
        if self.options.select == "random":
            scores = torch.rand(len(self.tiles), generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            scores = tile_scores(task_model, self.backbone, self._data,
                                 old_subspaces(self.total, self.options.energy), self.tiles)
        self._frozen = choose_frozen(self.tiles, scores, self.options.freeze_ratio)
        self._before = {n: p.detach().clone() for n, p in self.backbone.named_parameters()}
        self._freeze = TileFreeze(self.backbone, self.tiles, self._frozen)
        kept = measure_saved_bytes(task_model, images[0])
        if self.options.ssl_epochs:
            self._warm_up(task_model, train_ds, cfg, device, seed, name)
        tiled = sum(t.size for t in self.tiles)
        frozen = sum(t.size for t, f in zip(self.tiles, self._frozen) if f)
        return {"tiles": len(self.tiles), "tiles_frozen": sum(self._frozen), "freeze_ratio": frozen / tiled,
                "score_mean_frozen": _mean([s for s, f in zip(scores, self._frozen) if f]),
                "score_mean_retrained": _mean([s for s, f in zip(scores, self._frozen) if not f]),
                "kept_bytes": kept, "kept_mb": kept / 1e6}

    def _warm_up(self, task_model, train_ds, cfg, device, seed: int, name: str) -> None:
        from repnet.training import loop

        ssl = SimSiam(task_model, seed=seed).to(device)
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        params += [*ssl.projector.parameters(), *ssl.predictor.parameters()]
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        loop.fit(ssl, train_ds, dataclasses.replace(cfg, epochs=self.options.ssl_epochs), device, optimizer,
                 seed=seed, name=f"{name} self-supervised", objective=ssl.objective)

    def after_task(self, task_model: nn.Module) -> dict:
        self._freeze.release()
        written = sum(int((p.detach() != self._before[n]).sum()) for n, p in self.backbone.named_parameters())
        layers = tiled_layers(self.backbone)
        names = {id(p): n for n, p in self.backbone.named_parameters()}
        frozen_changed = 0
        for t, f in zip(self.tiles, self._frozen):
            if not f:
                continue
            conv, norm = layers[t.layer]
            for p in [conv.weight, *([norm.weight, norm.bias] if norm is not None and norm.affine else [])]:
                frozen_changed += int((p.detach()[t.start:t.stop] != self._before[names[id(p)]][t.start:t.stop]).sum())
        self.total = accumulate(self.total, input_covariances(task_model, self.backbone, [x for x, _ in self._data]))
        total = sum(p.numel() for p in self.backbone.parameters())
        self._before = None
        return {"weights_written": written, "backbone_weights": total, "written_fraction": written / total,
                "rram_writes_avoided": total - written, "frozen_weights_changed": frozen_changed}

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in (self.total or {}).items()}

    def load_state(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        expected = set(tiled_layers(self.backbone))
        if set(tensors) != expected:
            raise RepnetError(f"{where} does not fit this backbone's layers (hyblearn state)")
        self.total = dict(tensors)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None

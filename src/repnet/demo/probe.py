"""The demo's linear probe: multinomial logistic regression on the frozen backbone's pooled features
(full-batch L-BFGS, L2 strength chosen on the validation split).

It is the classical baseline of a frozen feature extractor, set beside FT-Last (the same classifier
trained by the loop with Adam and dropout): the features are computed once, and the test set is read
once, as for every other method.
"""
from __future__ import annotations

import time
import torch
from repnet.demo.config import LINEAR_PROBE, DemoConfig
from repnet.training.run import MEMORY_KEYS, memory_profile
from repnet.demo.config import method_config


# ----------------------------------------------------------------------------- linear probe
@torch.no_grad()
def _features(backbone, ds, device, batch_size=128):
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    feats, labels = [], []
    for x, y in loader:
        feats.append(backbone(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _fit_logistic(x, y, num_classes, l2, iters=200):
    """Multinomial logistic regression, full-batch L-BFGS, L2 on the weights (deterministic)."""
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(cfg: DemoConfig, l2_grid=(1e-5, 1e-4, 1e-3, 1e-2)) -> dict:
    """Logistic regression on frozen pooled features; L2 picked on the validation split."""
    from repnet.api import get_model
    from repnet.backbones import create_backbone
    from repnet.config.build import build_data
    from repnet.training.loop import resolve_device

    t0 = time.time()
    tc = method_config(cfg, "last")
    tc.augment = "none"  # features of the un-augmented images
    device = resolve_device(cfg.device)
    pretrained = False if cfg.random_init else True
    backbone = create_backbone(cfg.backbone, pretrained=pretrained).to(device).eval()
    train_ds, val_ds, test_ds, num_classes, _ = build_data(tc, backbone.mean, backbone.std)
    xtr, ytr = _features(backbone, train_ds, device)
    xva, yva = _features(backbone, val_ds, device)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6  # standardise with training statistics only
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    scores = {}
    for l2 in l2_grid:
        w, b = _fit_logistic(xtr, ytr, num_classes, l2)
        scores[l2] = ((xva @ w + b).argmax(1) == yva).float().mean().item()
    best_l2 = max(l2_grid, key=lambda v: (scores[v], v))
    w, b = _fit_logistic(xtr, ytr, num_classes, best_l2)
    xte, yte = _features(backbone, test_ds, device)
    test_acc = ((((xte - mean) / std) @ w + b).argmax(1) == yte).float().mean().item()
    model = get_model(cfg.backbone, "last", num_classes, image_size=cfg.image_size, pretrained=False,
                      memory=cfg.memory, dropout=0.0)
    trainable, total = model.param_counts()
    res = {"method": LINEAR_PROBE, "final_test_accuracy": test_acc, "test_accuracy": test_acc,
           "best_val_accuracy": scores[best_l2], "l2": best_l2, "val_accuracy_by_l2": scores,
           "trainable_params": trainable, "total_params": total, "train_images": len(train_ds),
           "test_images": len(test_ds), "wall_time_s": time.time() - t0}
    if cfg.profile_memory:  # training the linear head on frozen features = FT-Last's memory
        tc.options = {"dropout": 0.0}
        try:
            res.update(memory_profile(tc, num_classes, device))
        except Exception as e:  # noqa: BLE001 - a failed measurement must not lose the row
            res.update({k: None for k in MEMORY_KEYS}, memory_profile_error=f"{type(e).__name__}: {e}")
    return res

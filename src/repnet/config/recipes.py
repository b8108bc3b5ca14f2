"""Recipes and how a run's config is merged: defaults < the dataset's recipe < the runtime's recipe <
a config file < overrides (:func:`make_config`).

The recipes are YAML only: ``config/recipes/default.yaml`` updated by ``config/recipes/<dataset>.yaml``
(the paper's per-dataset rates, docs/recipes.md), and a runtime's own ``recipe.yaml`` (e.g. ExecuTorch's
SGD rates).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
import yaml
from repnet.errors import RepnetError
from repnet.config.schema import TrainConfig, coerce


RECIPES_DIR = Path(__file__).parent / "recipes"


def load_recipe(dataset: str) -> dict:
    """``recipes/default.yaml`` updated with ``recipes/<dataset>.yaml`` (if there is one: a dataset
    without one, e.g. ``imagefolder:<path>``, trains with the default recipe)."""
    recipe = read_yaml(RECIPES_DIR / "default.yaml")
    path = RECIPES_DIR / f"{dataset.split(':', 1)[0]}.yaml"
    if path.is_file():
        recipe.update(read_yaml(path))
    recipe.pop("description", None)
    return recipe


def load_runtime_recipe(runtime: str) -> dict:
    """What training on ``runtime`` changes in every dataset's recipe: the YAML file the runtime names
    (ExecuTorch: its SGD's learning rates); nothing for a runtime without one or an unknown name (which
    fails in ``TrainConfig.validate``)."""
    from repnet.runtime import RUNTIMES

    path = RUNTIMES.get(runtime).recipe if runtime in RUNTIMES else None
    recipe = read_yaml(Path(path)) if path else {}
    recipe.pop("description", None)
    return recipe


def has_recipe(dataset: str) -> bool:
    """Whether ``dataset`` has a recipe of its own (``recipes/<dataset>.yaml``)."""
    return (RECIPES_DIR / f"{dataset.split(':', 1)[0]}.yaml").is_file()


def tunes(cfg: TrainConfig) -> bool:
    """Whether the run of ``cfg`` chooses its learning rate first (``--tune``): as asked, or, unset, for a
    dataset without a recipe of its own when the run can (Adam / AdamW, a validation split, a runtime that
    trains in PyTorch)."""
    if cfg.tune is not None:
        return cfg.tune
    from repnet.runtime import get_runtime

    return (not has_recipe(cfg.dataset) and cfg.optimizer in ("adam", "adamw") and cfg.val_fraction > 0
            and get_runtime(cfg.runtime).tunes)


#: The largest YAML config read (configs are a few kilobytes).
YAML_MAX_BYTES = 1 << 20


def read_yaml(path: Path) -> dict:
    """A YAML file holding a mapping (safe loader: no tags that build objects); one-line errors: missing,
    not a regular file, too large, not UTF-8, not YAML, nested too deeply."""
    import stat

    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise RepnetError(f"cannot read {path}: not a regular file")
        if st.st_size > YAML_MAX_BYTES:
            raise RepnetError(f"{path} is {st.st_size:,d} bytes: too large for a config ({YAML_MAX_BYTES:,d} at most)")
        raw = path.read_bytes()
    except OSError as e:
        raise RepnetError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(raw) or {}  # (bytes: the YAML reader refuses undecodable ones in one line)
    except yaml.YAMLError as e:
        raise RepnetError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise RepnetError(f"{path} is nested too deeply to be a config: damaged or crafted") from None
    if not isinstance(data, dict):
        raise RepnetError(f"{path} must hold a mapping of config keys")
    return data


def make_config(overrides: dict | None = None, config_file: str | None = None) -> TrainConfig:
    """Merge: ``TrainConfig`` defaults < recipe of the dataset < recipe of the runtime <
    ``config_file`` < ``overrides``."""
    overrides = dict(overrides or {})
    from_file = read_yaml(Path(config_file)) if config_file else {}
    dataset = overrides.get("dataset", from_file.get("dataset", TrainConfig.dataset))
    runtime = overrides.get("runtime", from_file.get("runtime", TrainConfig.runtime))
    merged: dict[str, Any] = {}
    for source in (load_recipe(str(dataset)), load_runtime_recipe(str(runtime)), from_file, overrides):
        for key, value in source.items():
            value = coerce(key, value)
            if key == "options":
                value = {**merged.get("options", {}), **value}
            merged[key] = value
    cfg = TrainConfig(**merged)
    cfg.validate()
    return cfg

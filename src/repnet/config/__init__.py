"""The training configuration: its schema (:mod:`.schema`, ``TrainConfig``), the recipes and how a run's
config is merged (:mod:`.recipes`), how keys are spelled as flags (:mod:`.flags`), and what a config
builds (:mod:`.build`).

No torch at import: the command line reads it to build its flags. The recipes themselves are YAML
only (``config/recipes/*.yaml``); docs/recipes.md says where each value comes from.
"""
from repnet.registry import lazy_exports

_EXPORTS = {"TrainConfig": "schema", "FIELDS": "schema", "coerce": "schema", "SESSION_KEYS": "schema",
            "make_config": "recipes", "load_recipe": "recipes", "read_yaml": "recipes", "RECIPES_DIR": "recipes",
            "cli_flag": "flags", "train_arguments": "flags",
            "build_model": "build", "build_data": "build", "int8_settings": "build"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

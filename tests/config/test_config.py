"""The training configuration: recipes, the runtime's recipe, the merge order and coercion."""
import pytest
from repnet import RepnetError
from repnet.config.recipes import load_recipe, make_config


# ----------------------------------------------------------------------------- recipe / config
def test_recipes_follow_spec_table():
    r = load_recipe("aircraft")
    assert (r["lr"], r["lr_side"], r["label_smoothing"], r["augment"]) == (16e-4, 3e-3, 0.7, "jitter")
    r = load_recipe("pets")
    assert (r["lr"], r["lr_side"], r["label_smoothing"]) == (1e-4, 1e-4, 0.7)
    r = load_recipe("cifar100")
    assert (r["lr"], r["lr_side"], r["label_smoothing"], r["epochs"], r["batch_size"]) == (3e-4, 1e-3, 0.1, 50, 8)
    assert load_recipe("imagefolder:/x")["optimizer"] == "adam"


def test_runtime_recipe_sits_between_the_dataset_recipe_and_flags():
    eager = make_config({"dataset": "digits"})
    et = make_config({"dataset": "digits", "runtime": "executorch"})
    assert (eager.optimizer, eager.lr, eager.lr_side) == ("adam", 3e-4, 1e-3)
    assert (et.optimizer, et.lr, et.lr_side) == ("sgd", 3e-3, 5e-2)  # recipes/runtime-executorch.yaml
    assert et.label_smoothing == eager.label_smoothing and et.augment == eager.augment  # the dataset's own
    assert make_config({"dataset": "digits", "runtime": "executorch", "lr": "0.01"}).lr == 0.01
    with pytest.raises(RepnetError, match="runtime='tvm' is not valid"):
        make_config({"runtime": "tvm"})


def test_config_merge_order_and_coercion(tmp_path):
    cfg = make_config({"dataset": "cars", "lr": "1e-3", "epochs": "3", "options": {"connector": "up"}})
    assert cfg.lr == 1e-3 and cfg.lr_side == 1e-3 and cfg.epochs == 3 and cfg.label_smoothing == 0.7
    assert cfg.options == {"connector": "up"} and cfg.batch_size == 8
    with pytest.raises(RepnetError, match="unknown config key 'lrr'"):
        make_config({"lrr": 1})
    with pytest.raises(RepnetError, match="epochs='x': expected int"):
        make_config({"epochs": "x"})
    with pytest.raises(RepnetError, match="select_best_on='best' is not valid"):
        make_config({"select_best_on": "best"})

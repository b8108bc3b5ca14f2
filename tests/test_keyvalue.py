"""The one key=value parser and coercer: the same spelling means the same everywhere."""
import pytest
import repnet
from repnet import RepnetError
from repnet.keyvalue import coerce_value, parse_pairs


@pytest.mark.parametrize("value,typ,expected", [
    ("1", "bool", True), ("off", "bool", False), (True, "bool", True), ("8", "int", 8), ("8.0", "int", 8),
    ("3e-4", "float", 3e-4), ("none", "int | None", None), ("", "str | None", None), ("x", "str", "x"),
    ("{a: 1}", "dict", {"a": 1}),
])
def test_one_coercer_for_every_key_value(value, typ, expected):
    assert coerce_value(value, typ, "k") == expected


@pytest.mark.parametrize("value,typ", [("maybe", "bool"), ("8.5", "int"), ("true", "int"), (True, "int"),
                                       ("x", "float"), ("[1]", "dict"), (None, "int")])
def test_one_coercer_refuses_in_one_line(value, typ):
    with pytest.raises(RepnetError) as e:
        coerce_value(value, typ, "k")
    assert "\n" not in str(e.value)


def test_set_and_opt_accept_the_same_spellings():
    from repnet.config.recipes import make_config

    assert make_config({"int8": "1"}).int8 is True and make_config({"int8": "yes"}).int8 is True
    model = repnet.get_model("proxylessnas_mobile", "repnet", 3, image_size=32, pretrained=False, train_bias="1")
    assert model.options.train_bias is True
    assert parse_pairs(["a=1", " b = x=y "], "--set") == {"a": "1", "b": "x=y"}

"""The text and JSON forms of a spec: parsing, round trips, errors."""

import json

import pytest

import limitkernel as lk
from limitkernel.activations import REGISTRY
from limitkernel.layers import Dense
from limitkernel.spec import SpecError, from_json, parse, to_json

ISSUE_SPECS = [
    "3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)",
    "dense, erf(a=1.3, b=0.7, c=0.2), dense",
    "dense(w_std=1.4142135623730951, b_std=0.0), leaky_relu(alpha=0.1), dense",
]


@pytest.mark.parametrize("text", ISSUE_SPECS)
def test_issue_specs_parse_and_round_trip(text):
    spec = parse(text)
    assert parse(str(spec)) == spec
    assert from_json(to_json(spec)) == spec


def test_repeat_expands_and_defaults_apply():
    spec = parse(ISSUE_SPECS[0])
    assert len(spec) == 7
    assert spec.layers[0] == Dense(1.5, 0.05)
    assert spec.layers[1] == REGISTRY["relu"]()
    bare = parse("dense").layers[0]
    assert (bare.w_std, bare.b_std, bare.parameterization) == (1.0, 0.0, "ntk")


def test_python_objects_equal_text():
    relu = lk.get_activation("relu")
    built = lk.serial(*[lk.serial(Dense(1.5, 0.05), relu)] * 3, Dense(1.5, 0.05))
    assert built == parse(ISSUE_SPECS[0])
    assert lk.mlp(3, "relu", w_std=1.5, b_std=0.05) == built


def test_exact_floats_survive_round_trip():
    spec = parse("dense(w_std=1.4142135623730951), relu, dense(w_std=0.1)")
    again = parse(str(spec))
    assert again.layers[0].w_std == 1.4142135623730951
    assert again.layers[2].w_std == 0.1


def test_every_registered_activation_round_trips():
    for name, cls in REGISTRY.items():
        spec = lk.serial(Dense(), cls(), Dense())
        assert parse(str(spec)) == spec, name


def test_nested_groups_and_standard_parameterisation():
    text = "2 * [dense(parameterization=standard, width=512), 2 * [relu]], dense"
    spec = parse(text)
    assert len(spec) == 7
    assert spec.layers[0].parameterization == "standard"
    assert spec.layers[0].width == 512
    assert parse(str(spec)) == spec


@pytest.mark.parametrize("text, position, expected", [
    ("dense(w_std=1.5 b_std=0.05), relu", 17, "',' or ')'"),
    ("dense, relu,", 13, "a layer name"),
    ("3 [dense]", 3, "'*'"),
    ("dense(w_std=), relu", 13, "a number"),
    ("dense, relu) , dense", 12, "',' or end of spec"),
    ("3 * [dense, relu, dense", 24, "',' or ']'"),
])
def test_malformed_spec_reports_position(text, position, expected):
    with pytest.raises(SpecError) as info:
        parse(text)
    message = str(info.value)
    assert f"character {position}" in message
    assert expected in message


def test_unknown_activation_lists_closest_first():
    with pytest.raises(SpecError) as info:
        parse("dense, rleu, dense")
    message = str(info.value)
    assert "unknown layer 'rleu'" in message
    listed = message.split("closest first: ")[1].split(", ")
    assert listed[0] == "relu"
    assert set(listed) == set(REGISTRY) | {"dense", "layernorm", "dropout", "residual",
                                            "parallel", "concat"}


@pytest.mark.parametrize("text, fragment", [
    ("dense(w_std=-1)", ">= 0"),
    ("dense(parameterization=mup)", "'ntk' or 'standard'"),
    ("dense(depth=3)", "unknown parameter 'depth'"),
    ("relu_pow(k=5)", "k must be 2, 3 or 4"),
    ("leaky_relu(alpha=nan)", "finite"),
])
def test_invalid_parameters(text, fragment):
    with pytest.raises(SpecError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse(text)


def test_json_form_and_errors():
    data = {"layers": [{"layer": "dense", "w_std": 2.0}, {"layer": "relu"},
                       {"layer": "dense"}]}
    assert parse(json.dumps(data)) == parse("dense(w_std=2), relu, dense")
    with pytest.raises(SpecError, match="JSON layer 1"):
        from_json(json.dumps({"layers": [{"layer": "dense"}, {"layer": "rleu"}]}))
    with pytest.raises(SpecError, match="bad JSON spec at character"):
        from_json('{"layers": [')

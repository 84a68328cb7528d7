"""The text and JSON forms of a spec: parsing, round trips, errors."""

import json
from fractions import Fraction
from typing import ClassVar

import numpy as np
import pytest

import limitkernel as lk
from limitkernel.activations import REGISTRY
from limitkernel.layers import Dense
from limitkernel.spec import MAX_LAYERS, SpecError, from_json, parse, to_json

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
                                            "parallel", "concat", "conv", "avg_pool",
                                            "global_avg_pool", "flatten"}


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


# ---------------------------------------------------------------- robustness


@pytest.mark.parametrize("text, layer, key", [
    ("dense(w_std=1e200), relu, dense", "dense", "w_std"),
    ("dense, leaky_relu(alpha=1e308), dense", "leaky_relu", "alpha"),
    ("dense, exp(b=1e300), dense", "exp", "b"),
    ("dense, sin(b=1e300), dense", "sin", "b"),
    ("dense, residual(alpha=1e200)[relu, dense], dense", "residual", "alpha"),
    ("dense, concat(widths=1e308:1e308)[relu, dense; erf, dense], dense", "concat",
     "widths"),
])
def test_parameters_whose_square_overflows_name_the_layer_and_what_to_lower(text, layer,
                                                                             key):
    with pytest.raises(SpecError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith(f"{layer}: {key}=")
    assert f"lower {key}" in message and "layer at character" in message


def test_python_ints_too_large_for_a_float_are_refused_clearly():
    with pytest.raises(SpecError, match="w_std must be finite"):
        Dense(w_std=10 ** 400)


@pytest.mark.parametrize("value", [np.float32(1.5), np.int64(2), np.float64(0.25),
                                   np.int8(3), Fraction(3, 2)])
def test_numpy_scalars_and_other_reals_are_accepted(value):
    layer = Dense(w_std=value)
    assert layer.w_std == float(value) and type(layer.w_std) is float
    assert parse(str(lk.serial(layer))) == lk.serial(layer)


@pytest.mark.parametrize("value, fragment", [
    (True, "a bool"), (np.bool_(True), "a bool"), (1 + 0j, "a complex"),
    (np.complex128(1), "a complex"), ("1.5", "a str"), ([1.0], "a list"),
])
def test_non_real_parameters_are_refused(value, fragment):
    with pytest.raises(SpecError, match=f"w_std must be a real number, got {fragment}"):
        Dense(w_std=value)


def test_a_repeated_parameter_is_refused_with_its_position():
    with pytest.raises(SpecError, match=r"'w_std' is given twice \(again at character 16\)"):
        parse("dense(w_std=1, w_std=2), dense")
    with pytest.raises(SpecError, match="'w_std' appears twice"):
        from_json('{"layers": [{"layer": "dense", "w_std": 1, "w_std": 2}]}')


@pytest.mark.parametrize("text", [
    "dense(parameterization='standard', width=512), relu, dense",
    'dense(parameterization="standard", width=512), relu, dense',
    "dense(parameterization = 'standard' , width=512), relu, dense",
])
def test_quoted_words_equal_bare_words(text):
    bare = parse("dense(parameterization=standard, width=512), relu, dense")
    assert parse(text) == bare
    assert parse(str(parse(text))) == bare


def test_unterminated_string_reports_where_it_starts():
    with pytest.raises(SpecError, match="character 24: expected a closing '"):
        parse("dense(parameterization='standard), dense")


@pytest.fixture
def word_layer():
    """A layer kind with a free-text parameter, registered for one test."""
    from limitkernel.spec import REGISTRY, Layer

    class Tagged(Layer):
        name = "tagged_for_test"
        defaults: ClassVar[dict] = {"tag": "plain", "scale": 1.0}

    REGISTRY[Tagged.name] = Tagged
    try:
        yield Tagged
    finally:
        del REGISTRY[Tagged.name]


@pytest.mark.parametrize("tag", ["two words", "it's", 'say "hi"', "both ' and \"",
                                 "back\\slash", "3d", "nan", "x,y]", "", "é_ok"])
def test_any_string_parameter_survives_str_and_parse(word_layer, tag):
    spec = lk.serial(word_layer(tag=tag), word_layer(tag=tag, scale=2.0))
    assert parse(str(spec)) == spec


def test_repeat_counts_are_checked_before_expanding():
    for text in ["99999999999999999999 * [dense]", "200000 * [dense]",
                 "100000000 * [dense, relu], dense", "1000 * [1000 * [dense]]",
                 "9" * 5000 + " * [dense]"]:
        with pytest.raises(SpecError, match="100000 layers a spec may hold"):
            parse(text)
    assert len(parse("100000 * [dense]")) == MAX_LAYERS
    assert len(parse("0000002 * [dense]")) == 2
    with pytest.raises(SpecError, match="more than the 100000"):
        parse("60000 * [dense], 60000 * [relu]")


def test_python_built_specs_are_capped_alike():
    with pytest.raises(SpecError, match="at least 100001 layers"):
        lk.serial(*[Dense()] * (MAX_LAYERS + 1))
    inner = lk.serial(*[Dense()] * 60000)
    block = parse("residual[dense]").layers[0].from_branches([inner])
    with pytest.raises(SpecError, match="counting those inside blocks"):
        lk.serial(block, inner)


def test_nesting_is_capped_without_recursion_errors():
    with pytest.raises(SpecError, match="brackets nest more than 50 deep"):
        parse("[" * 500 + "dense" + "]" * 500)
    with pytest.raises(SpecError, match="brackets nest more than 50 deep"):
        parse("dense, " + "residual[" * 60 + "dense" + "]" * 60 + ", dense")
    assert parse("[" * 50 + "dense" + "]" * 50) == parse("dense")
    deep = "dense, " + "residual[dense, " * 20 + "relu" + "]" * 20 + ", dense"
    assert parse(str(parse(deep))) == parse(deep)
    with pytest.raises(SpecError, match="nests too deeply"):
        from_json("[" * 100000 + "]" * 100000)
    layer = {"layer": "dense"}
    for _ in range(60):
        layer = {"layer": "residual", "branches": [[layer]]}
    with pytest.raises(SpecError, match="nest more than 50 deep"):
        from_json(json.dumps({"layers": [layer, {"layer": "dense"}]}))


@pytest.mark.parametrize("name", [5, None, [1], {"a": 1}, 1.5, True])
def test_json_layer_names_must_be_strings(name):
    with pytest.raises(SpecError, match="NAME a string"):
        from_json(json.dumps({"layers": [{"layer": name}]}))
    with pytest.raises(SpecError, match="a layer name is a string"):
        lk.spec.layer_from_name(name, {})


def test_str_of_a_hundred_thousand_layers_returns_and_round_trips():
    spec = lk.mlp(MAX_LAYERS // 2 - 1)
    assert len(spec) == MAX_LAYERS - 1
    assert str(spec) == f"{MAX_LAYERS // 2 - 1} * [dense, relu], dense"
    assert parse(str(spec)) == spec
    # A period longer than str() looks for: nothing folds, and it still returns.
    varied = lk.serial(*[Dense(w_std=1 + (i % 300) / 1000) for i in range(20000)])
    text = str(varied)
    assert "*" not in text
    assert text.count("dense") == 20000
    assert parse(text) == varied


def test_str_does_o_n_work_per_group_length(monkeypatch):
    # Each group length costs one vectorised scan of the whole sequence: a
    # 20000-layer spec takes at most _MAX_GROUP scans (plus those of the small
    # groups it folds), not one per position and length.
    calls = []
    real = lk.spec._run_lengths
    monkeypatch.setattr(lk.spec, "_run_lengths", lambda eq: calls.append(len(eq)) or real(eq))
    rng = np.random.default_rng(0)
    acts = [lk.get_activation(name) for name in ("relu", "erf", "gelu", "abs")]
    layers = [layer for i in rng.integers(0, 4, 10000) for layer in (Dense(), acts[i])]
    spec = lk.serial(*layers)
    text = str(spec)
    assert parse(text) == spec
    assert sum(calls) <= 2 * lk.spec._MAX_GROUP * len(layers)


@pytest.mark.parametrize("text, expected", [
    ("dense, relu, dense, relu, layernorm, dense, relu, dense, relu, layernorm, dense",
     "2 * [2 * [dense, relu], layernorm], dense"),
    ("dense, relu, relu, relu, dense", "dense, 3 * [relu], dense"),
    ("3 * [dense, relu], dense", "3 * [dense, relu], dense"),
    ("dense, erf, dense, relu, dense", "dense, erf, dense, relu, dense"),
])
def test_str_folds_repeats_readably(text, expected):
    assert str(parse(text)) == expected


def test_a_spec_that_expands_to_no_layers_is_refused():
    # It printed as "" (no text parses back to it), and no network has no layers.
    for text in ("0 * [dense]", "0 * [0 * [relu]]", '{"layers": []}'):
        with pytest.raises(SpecError, match="no layers"):
            parse(text)
    assert parse("0 * [relu], dense") == parse("dense")

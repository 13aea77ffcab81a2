"""The recipe schema: defaults, validation messages, YAML round trip, the shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from retrofit.errors import RecipeError
from retrofit.finetune_config import TrainConfig
from retrofit.recipe import (
    CutoutSpec,
    DropBlockSpec,
    Recipe,
    StochasticDepthSpec,
    UoutSpec,
    load_recipe,
)

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def _error(d: dict) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(d)
    return info.value


# --- defaults ---------------------------------------------------------------------------------


def test_empty_section_and_null_enable_with_defaults():
    for body in ({}, None, True):
        r = load_recipe({"stochastic_depth": body})
        assert r.stochastic_depth == StochasticDepthSpec()
    sd = StochasticDepthSpec()
    assert (sd.p_L, sd.schedule, sd.mode, sd.scaling, sd.seed) == (
        0.5,
        "linear",
        "row",
        "inverted",
        None,
    )


def test_section_defaults_match_the_papers():
    db = load_recipe({"dropblock": None}).dropblock
    assert db == DropBlockSpec(
        stages=(3, 4), block_size=7, keep_prob=0.9, placement="stages", per_channel=False, ramp=1.0
    )
    assert load_recipe({"uout": {}}).uout == UoutSpec(beta=0.1)
    assert load_recipe({"cutout": {}}).cutout == CutoutSpec(n_holes=1, length=16)


def test_absent_or_false_sections_are_disabled():
    r = load_recipe({"stochastic_depth": {}, "dropblock": False})
    assert r.dropblock is None and r.uout is None and r.cutout is None and r.dropout_fix is None
    assert r.techniques() == ["stochastic_depth"]
    assert load_recipe(None) == Recipe() and Recipe().techniques() == []


def test_techniques_in_canonical_order():
    r = load_recipe(
        {"cutout": {}, "dropout_fix": "after_last_bn", "dropblock": {}, "stochastic_depth": {}}
    )
    assert r.techniques() == ["stochastic_depth", "dropblock", "dropout_fix", "cutout"]


def test_values_are_resolved():
    r = load_recipe({"stochastic_depth": {"p_L": 1}, "dropblock": {"stages": "layer3"}})
    assert r.stochastic_depth.p_L == 1.0 and isinstance(r.stochastic_depth.p_L, float)
    assert r.dropblock.stages == ("layer3",)  # a single stage may omit the list


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d, field, value",
    [
        ({"stochastic_depth": {"p_L": 0}}, "stochastic_depth.p_L", 0),
        ({"stochastic_depth": {"p_L": 1.5}}, "stochastic_depth.p_L", 1.5),
        ({"stochastic_depth": {"p_L": float("nan")}}, "stochastic_depth.p_L", None),
        ({"stochastic_depth": {"schedule": "cosine"}}, "stochastic_depth.schedule", "cosine"),
        ({"stochastic_depth": {"mode": "rows"}}, "stochastic_depth.mode", "rows"),
        ({"stochastic_depth": {"scaling": "none"}}, "stochastic_depth.scaling", "none"),
        ({"stochastic_depth": {"seed": -1}}, "stochastic_depth.seed", -1),
        ({"stochastic_depth": {"seed": 1.5}}, "stochastic_depth.seed", 1.5),
        ({"dropblock": {"stages": []}}, "dropblock.stages", []),
        ({"dropblock": {"stages": [0, 3]}}, "dropblock.stages", [0, 3]),
        ({"dropblock": {"stages": [3, 3]}}, "dropblock.stages", [3, 3]),
        ({"dropblock": {"stages": [3.5]}}, "dropblock.stages", [3.5]),
        ({"dropblock": {"block_size": 0}}, "dropblock.block_size", 0),
        ({"dropblock": {"block_size": 7.0}}, "dropblock.block_size", 7.0),
        ({"dropblock": {"keep_prob": 0}}, "dropblock.keep_prob", 0),
        ({"dropblock": {"keep_prob": 1.1}}, "dropblock.keep_prob", 1.1),
        ({"dropblock": {"placement": "everywhere"}}, "dropblock.placement", "everywhere"),
        ({"dropblock": {"per_channel": "yes"}}, "dropblock.per_channel", "yes"),
        ({"dropblock": {"ramp": 0}}, "dropblock.ramp", 0),
        ({"uout": {"beta": 0}}, "uout.beta", 0),
        ({"uout": {"beta": 2}}, "uout.beta", 2),
        ({"cutout": {"n_holes": -1}}, "cutout.n_holes", -1),
        ({"cutout": {"length": 0}}, "cutout.length", 0),
        ({"dropout_fix": "move"}, "dropout_fix", "move"),
        ({"uout": [0.1]}, "uout", [0.1]),
    ],
)
def test_errors_name_field_value_and_allowed(d, field, value):
    e = _error(d)
    assert e.field == field
    assert f"'{field}'" in str(e)
    if value is not None:
        assert e.value == value
        assert repr(value) in str(e)
    assert "allowed" in str(e) and e.allowed


@pytest.mark.parametrize(
    "d, field",
    [
        ({"stochastic_depth": {"p_L": True}}, "stochastic_depth.p_L"),
        ({"dropblock": {"keep_prob": False}}, "dropblock.keep_prob"),
        ({"dropblock": {"block_size": True}}, "dropblock.block_size"),
        ({"dropblock": {"stages": [True]}}, "dropblock.stages"),
        ({"uout": {"beta": True}}, "uout.beta"),
        ({"cutout": {"n_holes": True}}, "cutout.n_holes"),
    ],
)
def test_bool_is_not_a_number(d, field):
    e = _error(d)
    assert e.field == field
    assert "True" in str(e) or "False" in str(e)


def test_numeric_strings_follow_the_yaml_exponent_rule():
    # YAML 1.1 reads 1e-1 (no dot) as a string; the trainer accepts those, and so do the sections.
    r = load_recipe(yaml.safe_load("uout: {beta: 1e-1}"))
    assert r.uout.beta == pytest.approx(0.1)
    e = _error({"cutout": {"length": "16"}})
    assert e.field == "cutout.length" and "without quotes" in str(e)


@pytest.mark.parametrize(
    "d, field, suggestion",
    [
        ({"stochastic_dept": {}}, "stochastic_dept", "stochastic_depth"),
        ({"drop_block": {}}, "drop_block", "dropblock"),
        ({"stochastic_depth": {"p_l": 0.3}}, "stochastic_depth.p_l", "p_L"),
        ({"stochastic_depth": {"shedule": "linear"}}, "stochastic_depth.shedule", "schedule"),
        ({"dropblock": {"blocksize": 5}}, "dropblock.blocksize", "block_size"),
        ({"dropblock": {"keep_porb": 0.9}}, "dropblock.keep_porb", "keep_prob"),
        ({"uout": {"betta": 0.1}}, "uout.betta", "beta"),
        ({"cutout": {"n_hole": 1}}, "cutout.n_hole", "n_holes"),
        ({"stochastic_depth": {"mode": "btach"}}, "stochastic_depth.mode", "batch"),
    ],
)
def test_did_you_mean(d, field, suggestion):
    e = _error(d)
    assert e.field == field
    assert f"did you mean '{suggestion}'?" in str(e)


def test_top_level_field_points_at_its_section():
    e = _error({"p_L": 0.5})
    assert e.field == "p_L" and "stochastic_depth" in str(e)


def test_uout_and_dropout_fix_are_exclusive():
    e = _error({"uout": {}, "dropout_fix": "after_last_bn"})
    assert e.field == "dropout_fix" and "uout" in str(e)


def test_train_section_uses_the_trainers_schema():
    r = load_recipe({"train": {"epochs": 2, "batch_size": 64}})
    assert isinstance(r.train, TrainConfig)
    assert r.train.epochs == 2 and r.train.batch_size == 64
    e = _error({"train": {"epocs": 2}})
    assert e.field == "train.epocs" and "did you mean 'epochs'?" in str(e)
    assert _error({"train": {"epochs": 0}}).field == "train.epochs"


# --- files ------------------------------------------------------------------------------------


def test_yaml_file_round_trip(tmp_path):
    src = {
        "stochastic_depth": {"p_L": 0.8, "mode": "batch", "seed": 3},
        "dropblock": {"stages": [3, "layer4"], "keep_prob": 0.85, "placement": "blocks"},
        "cutout": {"n_holes": 2, "length": 8},
        "dropout_fix": "after_last_bn",
        "train": {"epochs": 2},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(src))
    r = load_recipe(path)
    assert load_recipe(str(path)) == r
    assert r.dropblock.stages == (3, "layer4")
    # to_dict is resolved (every default filled in), JSON-ready, and loads back to an equal recipe.
    d = r.to_dict()
    assert d["stochastic_depth"] == {
        "p_L": 0.8,
        "schedule": "linear",
        "stagewise": False,
        "warmup": 0.0,
        "mode": "batch",
        "scaling": "inverted",
        "seed": 3,
    }
    assert d["dropblock"]["stages"] == [3, "layer4"]
    json.dumps(d)
    assert load_recipe(d) == r
    again = tmp_path / "again.yaml"
    again.write_text(r.to_yaml())
    assert load_recipe(again) == r
    assert "uout" not in d  # a disabled section is left out, not written as null (= enabled)


def test_recipe_instance_passes_through():
    r = load_recipe({"uout": {}})
    assert load_recipe(r) is r


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value) and "not found" in str(info.value)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stochastic_depth:\n  p_L: [0.5\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "bad.yaml" in str(info.value) and "line" in str(info.value)


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- stochastic_depth\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "mapping" in str(info.value)


def test_empty_file_is_an_empty_recipe(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# only a comment\n")
    assert load_recipe(path) == Recipe()


def test_yaml_tags_do_not_execute(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("stochastic_depth: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RecipeError):
        load_recipe(path)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert r.techniques(), f"{path.name} enables nothing"
    assert r.train is not None
    assert load_recipe(r.to_dict()) == r


def test_shipped_recipes_are_the_papers_settings():
    by_name = {p.name: load_recipe(p) for p in RECIPES}
    assert {"sd.yaml", "sd_batch.yaml", "dropblock.yaml", "cutout.yaml", "uout.yaml"} <= set(
        by_name
    )
    assert by_name["sd.yaml"].stochastic_depth == StochasticDepthSpec(p_L=0.5)
    assert by_name["sd_batch.yaml"].stochastic_depth.mode == "batch"
    db = by_name["dropblock.yaml"].dropblock
    assert (db.stages, db.block_size, db.keep_prob, db.placement) == ((3, 4), 7, 0.9, "blocks")
    assert by_name["cutout.yaml"].cutout == CutoutSpec(n_holes=1, length=16)
    assert by_name["uout.yaml"].uout == UoutSpec(beta=0.1)

"""params.yaml validation: every bad value fails with one message naming key, value and what is allowed."""

from __future__ import annotations

import pytest
import yaml

from src.params import (
    ARTICLE_MODEL,
    ARTICLE_TRAIN,
    CollectParams,
    Params,
    ParamsError,
    effective,
    flatten,
    load_params,
    parse_params,
)


def shipped(text: str) -> Params:
    return parse_params(yaml.safe_load(text), source="HEAD:params.yaml")


def error_of(raw) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return str(info.value)


def test_shipped_params_load(shipped_params_text):
    params = shipped(shipped_params_text)
    assert params.collect.games == ["Breakout-v4", "AirRaid-v4", "Pong-v4"]
    assert params.collect.train_frames > 0 and params.collect.holdout_frames > 0
    assert params.train.device in {"auto", "cpu", "cuda"} or params.train.device.startswith("cuda:")


def test_empty_file_gives_defaults():
    assert parse_params(None) == Params()


def keys_left_out(params_text: str) -> set[str]:
    """The dotted keys Params defines that the file's top level does not spell out (profiles aside). Below a
    section, a mapping the file writes (a `tune.space` entry) covers the keys it leaves to their defaults."""
    spelled: set[str] = set()

    def walk(prefix: str, value) -> None:
        spelled.add(prefix)
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)

    walk("", {k: v for k, v in yaml.safe_load(params_text).items() if k != "profiles"})

    def covered(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:n]) in spelled for n in range(min(2, len(parts)), len(parts) + 1))

    return {key for key in flatten(Params()) if not covered(key)}


def test_params_yaml_spells_out_every_key(shipped_params_text):
    # One source of truth: every setting that runs is in params.yaml, none on a default the file does not
    # show. Only the keys are checked, not the values: those are the user's to change.
    assert keys_left_out(shipped_params_text) == set()
    without_one = shipped_params_text.replace("\n  fid_samples:", "\n  # fid_samples:", 1)
    assert keys_left_out(without_one) == {"train.fid_samples"}


@pytest.mark.parametrize(
    ("raw", "key"),
    [({"collect": {"train_frame": 5}}, "collect.train_frame"), ({"colect": {}}, "colect")],
)
def test_unknown_key_names_key_and_allowed_keys(raw, key):
    message = error_of(raw)
    assert f"unknown key '{key}'" in message
    section = CollectParams if key.startswith("collect.") else Params
    assert all(name in message for name in section.model_fields)


def test_wrong_type():
    message = error_of({"collect": {"train_frames": "many"}})
    assert "collect.train_frames = 'many'" in message and "valid integer" in message


def test_yes_no_is_not_a_number():
    assert "collect.train_frames = True: expected a number" in error_of({"collect": {"train_frames": True}})


def test_negative_frames():
    message = error_of({"collect": {"holdout_frames": -5}})
    assert "collect.holdout_frames = -5" in message and "value > 0" in message


@pytest.mark.parametrize("key", ["lr_g", "lr_d"])
@pytest.mark.parametrize("lr", [0, -1e-4])
def test_learning_rate_must_be_positive(key, lr):
    message = error_of({"train": {key: lr}})
    assert f"train.{key} = {lr!r}" in message and "0 < value < 1" in message


@pytest.mark.parametrize("key", ["beta1", "beta2"])
@pytest.mark.parametrize("beta", [1.0, 1.5, -0.1])
def test_beta_outside_unit_interval(key, beta):
    message = error_of({"train": {key: beta}})
    assert f"train.{key} = {beta!r}" in message and "0 <= value < 1" in message


def test_beta_edges_allowed():
    params = parse_params({"train": {"beta1": 0.0, "beta2": 0.9999}})
    assert (params.train.beta1, params.train.beta2) == (0.0, 0.9999)


def test_unknown_game_suggests_closest_ids():
    message = error_of({"collect": {"games": ["Pong-v4", "Breakout-v44"]}})
    assert "collect.games" in message and "unknown game 'Breakout-v44'" in message
    assert "closest valid ids: Breakout-v4" in message


def test_game_listed_twice():
    assert "each game may appear once" in error_of({"collect": {"games": ["Pong-v4", "Pong-v4"]}})


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", ""])
def test_bad_device(device):
    message = error_of({"train": {"device": device}})
    assert f"train.device = {device!r}" in message and "auto, cpu, cuda, cuda:N" in message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_good_device(device):
    assert parse_params({"train": {"device": device}}).train.device == device


def test_bad_upsample_lists_choices():
    message = error_of({"model": {"upsample": "cubic"}})
    assert "model.upsample = 'cubic'" in message and all(f"'{k}'" in message for k in ("transposed", "nearest", "bilinear"))


def test_bad_interpolation_lists_choices():
    message = error_of({"collect": {"interpolation": "bilinear"}})
    assert "collect.interpolation = 'bilinear'" in message
    assert all(name in message for name in ("linear", "area", "nearest", "cubic"))


def test_one_problem_is_one_line_and_all_problems_are_reported():
    assert "\n" not in error_of({"seed": -1})
    message = error_of({"collect": {"train_frames": -1, "holdout_frames": -2}})
    assert "2 invalid values" in message
    assert "collect.train_frames = -1" in message and "collect.holdout_frames = -2" in message


def test_top_level_must_be_a_mapping():
    assert "expected a mapping" in error_of([1, 2])


def test_load_params_reports_file_problems(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("collect: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_effective_applies_the_article_recipe():
    custom = parse_params({"model": {"gen_filters": 8}, "train": {"lr_g": 3e-3, "batch_size": 128, "ema_decay": 0.99,
                                                                  "fid_every": 100, "image_every": 50}})
    assert effective(custom) is custom
    article = effective(custom.model_copy(update={"train": custom.train.model_copy(update={"recipe": "article"})}))
    assert article.model.model_dump() == ARTICLE_MODEL
    assert {k: getattr(article.train, k) for k in ARTICLE_TRAIN} == ARTICLE_TRAIN
    assert article.train.lr_g == 1e-4 and article.train.batch_size == 16 and article.model.gen_filters == 64
    # Settings the recipe does not own are kept.
    assert article.train.iterations == custom.train.iterations and article.collect == custom.collect


@pytest.mark.parametrize("train, schedules", [
    ({}, ()),
    ({"lr_decay": "linear"}, ("train.lr_decay: linear",)),
    ({"gamma_end_fraction": 0.1, "r1_gamma": 1.0, "r2_gamma": 0.0}, ("train.gamma_end_fraction: 0.1",)),
    ({"gamma_end_fraction": 0.1, "r1_gamma": 0.0, "r2_gamma": 0.0}, ()),  # no penalty: gamma has nothing to fall
    ({"lr_decay": "linear", "gamma_end_fraction": 0.5, "r2_gamma": 1.0},
     ("train.lr_decay: linear", "train.gamma_end_fraction: 0.5")),
])
def test_budget_schedules_name_what_ends_at_the_budget(train, schedules):
    assert parse_params({"train": train}).train.budget_schedules == schedules


def test_flatten_uses_dotted_keys():
    flat = flatten(Params())
    assert flat["collect.train_frames"] == Params().collect.train_frames
    assert flat["train.lr_g"] == Params().train.lr_g


def test_yaml_is_read_strictly_at_any_depth_and_otherwise_as_safe_load(shipped_params_text):
    from src.strict_yaml import DuplicateKeyError, strict_load

    assert strict_load(shipped_params_text) == yaml.safe_load(shipped_params_text)  # DVC's reading is unchanged
    with pytest.raises(DuplicateKeyError, match=r"key 'train' appears twice \(lines 1 and 3\)"):
        strict_load("train: {lr_g: 0.1}\nseed: 1\ntrain: {lr_d: 0.1}\n")
    with pytest.raises(DuplicateKeyError, match=r"key 'tune.space.0.low' appears twice"):
        strict_load("tune:\n  space:\n    - {low: 1, low: 2}\n")
    assert strict_load("base: &b {x: 1}\nd:\n  <<: *b\n  x: 2\n")["d"] == {"x": 2}  # a merge may override

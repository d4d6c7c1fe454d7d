"""The `profile` key: cpu/gpu values over params.yaml's, `auto` from the training device, and `auto` intervals."""

from __future__ import annotations

import logging

import pytest
import yaml

from src.params import AUTO_POINTS, ParamsError, effective, parse_params, with_profile
from src.profile import apply_profile, load_run_params, profile_changes, resolve_profile


def test_a_profile_sets_its_values_and_nothing_else():
    base = parse_params({"profiles": {"cpu": {"train": {"iterations": 7}, "evaluate": {"num_samples": 9}}}})
    cpu = with_profile(base, "cpu")
    assert (cpu.profile, cpu.train.iterations, cpu.evaluate.num_samples) == ("cpu", 7, 9)
    assert cpu.model_dump(exclude={"profile", "train", "evaluate"}) == base.model_dump(exclude={"profile", "train", "evaluate"})
    assert cpu.train.model_dump(exclude={"iterations"}) == base.train.model_dump(exclude={"iterations"})
    gpu = with_profile(base, "gpu")
    assert gpu.model_dump(exclude={"profile"}) == base.model_dump(exclude={"profile"})


def test_a_file_without_profiles_runs_as_written(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "params.yaml"
    path.write_text("train: {iterations: 6}\n")
    assert load_run_params(path).train.iterations == 6


def test_explicit_profile_wins_over_the_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_profile(parse_params({}))[0] == "gpu"
    assert resolve_profile(parse_params({"profile": "cpu"}))[0] == "cpu"
    assert resolve_profile(parse_params({"train": {"device": "cpu"}}))[0] == "cpu"  # training on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_profile(parse_params({}))[0] == "cpu"
    assert resolve_profile(parse_params({"profile": "gpu"}))[0] == "gpu"


def test_apply_profile_says_what_it_changed(caplog):
    params = parse_params({"profile": "cpu", "profiles": {"cpu": {"train": {"iterations": 11}}}})
    with caplog.at_level(logging.INFO, logger="src.profile"):
        ran = apply_profile(params)
    assert ran.train.iterations == 11 and ran.profile == "cpu"
    assert "profile: cpu (set in params.yaml): train.iterations=11" in caplog.text
    assert profile_changes(params, "cpu") == {"train.iterations": 11}


@pytest.mark.parametrize(("profiles", "named"), [
    ({"cpu": {"train": {"iterations": 0}}}, "train.iterations"),
    ({"cpu": {"train": {"iteratons": 5}}}, "iteratons"),
    ({"cpu": {"collect": {"train_frames": 5}}}, "profiles.cpu.collect"),
    ({"laptop": {}}, "profiles.laptop"),
])
def test_bad_profile_values_are_refused_when_params_load(profiles, named):
    with pytest.raises(ParamsError, match=named.replace(".", r"\.")):
        parse_params({"profiles": profiles})


@pytest.mark.shipped
def test_the_shipped_cpu_profile_is_valid_and_smaller(shipped_params_text):
    shipped = parse_params(yaml.safe_load(shipped_params_text))
    cpu = with_profile(shipped, "cpu")
    assert cpu.train.iterations < shipped.train.iterations
    assert cpu.evaluate.holdout_samples is not None and cpu.evaluate.num_samples <= shipped.evaluate.num_samples


@pytest.mark.parametrize("iterations", [1, 4, 5, 999, 20_000])
def test_auto_intervals_give_about_five_points(iterations):
    train = effective(parse_params({"train": {"iterations": iterations}})).train
    for every in (train.fid_every, train.image_every):
        assert isinstance(every, int) and every >= 1
        assert AUTO_POINTS <= iterations // every <= AUTO_POINTS + 1 or iterations < AUTO_POINTS
    explicit = effective(parse_params({"train": {"iterations": iterations, "fid_every": 3, "image_every": 0 + 2}})).train
    assert (explicit.fid_every, explicit.image_every) == (3, 2)


@pytest.mark.parametrize("value", ["sometimes", -1, True, 1.5])
def test_bad_intervals_are_refused(value):
    with pytest.raises(ParamsError, match="fid_every"):
        parse_params({"train": {"fid_every": value}})


def test_load_run_params_resolves_everything(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "params.yaml"
    path.write_text("train: {recipe: article, iterations: 50}\nprofiles: {cpu: {train: {iterations: 25}}}\n")
    ran = load_run_params(path)
    assert ran.profile == "cpu" and ran.train.iterations == 25
    assert ran.train.fid_every == 25 // AUTO_POINTS and ran.train.batch_size == 16  # article recipe applied


@pytest.mark.shipped
@pytest.mark.parametrize("profile_name", ["cpu", "gpu"])
def test_each_shipped_profile_trains_the_recipe_the_study_measured(shipped_params_text, profile_name):
    # The README's figures for each budget are the quality study's runs of that budget's recipe.
    from benchmarks.quality_study import CPU_PROFILE_RECIPE, GPU_DEFAULT_RECIPE, RECIPES, with_overrides

    recipe = {"cpu": CPU_PROFILE_RECIPE, "gpu": GPU_DEFAULT_RECIPE}[profile_name]
    shipped = parse_params(yaml.safe_load(shipped_params_text))
    profile = with_profile(shipped, profile_name)
    studied = with_overrides(shipped, RECIPES[recipe])
    budget = {"iterations", "time_budget_s", "fid_samples", "fid_every", "log_every", "image_every", "checkpoint_every"}
    stale = (f"the committed params.yaml's {profile_name} profile no longer trains `{recipe}`, the study recipe whose "
             "runs README.md and benchmarks/RESULTS.md quote: measure the new recipe with benchmarks/quality_study.py "
             "and name it in CPU_PROFILE_RECIPE / GPU_DEFAULT_RECIPE, or restore the recipe keys")
    assert profile.train.model_dump(exclude=budget) == studied.train.model_dump(exclude=budget), stale
    # The study draws its recipes raw and scores them with the palette afterwards, as evaluate does.
    assert profile.model.model_dump(exclude={"palette_size"}) == studied.model.model_dump(exclude={"palette_size"}), stale

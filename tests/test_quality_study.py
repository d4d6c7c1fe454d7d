"""The CPU study's pure parts (benchmarks/quality_study.py, benchmarks/prc_scale.py): every recipe is valid params,
the pairs table compares a recipe with the baseline only on the baseline's seeds, the runs table gives each game's
palette floor where a record has one, the scale table scores each set at each k as evaluate does."""

from __future__ import annotations

import pytest
import torch
import yaml

from benchmarks.quality_study import CPU_PROFILE_RECIPE, RECIPES, against, study_params, with_overrides, yardstick
from src.params import effective, parse_params


def test_every_recipe_is_valid_params_over_the_shipped_file(shipped_params_text):
    base = parse_params(yaml.safe_load(shipped_params_text))
    for overrides in RECIPES.values():
        with_overrides(base, overrides)  # raises on a key or value params.py refuses


@pytest.mark.parametrize("recipe", ["article", CPU_PROFILE_RECIPE])
def test_a_study_run_gets_the_params_as_they_run(shipped_params_text, recipe):
    """train_gan refuses params that `effective` would still change (the article recipe's settings)."""
    base = parse_params(yaml.safe_load(shipped_params_text))
    params = study_params(base, recipe, seed=0, budget_s=600, fid_every=500, fid_samples=250, samples=2048)
    assert effective(params) == params
    assert params.train.time_budget_s == 600 and params.seed == 0


def record(recipe: str, seed: int, raw: float, palette: float, budget_s: float = 600, **extra) -> dict:
    return {"recipe": recipe, "seed": seed, "iterations": 6000, "budget_s": budget_s, **extra,
            "eval": {"fid_raw": raw, "fid_palette": palette, "coverage_tv": 0.001, "density": 0.5, "coverage": 0.25}}


def test_the_pairs_table_takes_means_over_the_baselines_seeds():
    records = [record("base", 0, 100, 40), record("base", 1, 140, 60), record("new", 0, 90, 30),
               record("new", 1, 110, 30), record("one-seed", 0, 10, 10)]
    lines = against(records, "base").splitlines()
    assert lines[2].startswith("| base |") and lines[2].endswith("| 120.0 / 50.0 | 0.500 / 0.250 | 1.00× / 1.00× |")
    assert lines[3].startswith("| new | 90.0 / 30.0, 0.001, 6,000 | 110.0 / 30.0")
    assert lines[3].endswith("| 100.0 / 30.0 | 0.500 / 0.250 | 0.83× / 0.60× |")
    assert not any("one-seed" in line for line in lines)  # one seed is no like-for-like mean
    with pytest.raises(ValueError, match="no scored run of 'missing'"):
        against(records, "missing")


def test_the_pairs_table_at_a_budget_pairs_the_checkpointed_runs_reaching_it():
    curve = lambda recipe, seed, raw, budget_s: record(recipe, seed, raw, raw / 4, budget_s,  # noqa: E731
                                                       checkpointed=True)
    records = [curve("base", 0, 80, 3600), curve("base", 1, 80, 3600), curve("base", 0, 100, 600),
               curve("base", 1, 100, 600), curve("new", 0, 60, 3600), curve("new", 1, 60, 3600),
               record("new", 0, 1, 1), record("new", 1, 1, 1)]
    lines = against(records, "base", budget_s=3600).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| base", "| new"]
    assert lines[2].endswith("| 80.0 / 20.0 | 0.500 / 0.250 | 1.00× / 1.00× |")
    assert lines[3].endswith("| 60.0 / 15.0 | 0.500 / 0.250 | 0.75× / 0.75× |")
    with pytest.raises(ValueError, match="no scored run of 'base'"):
        against(records, "base")  # without a budget only the runs not checkpointed, and base has none


def test_the_runs_tables_floors_give_each_games_palette_floor_where_a_record_has_it():
    def scored(palette_floors: bool) -> dict:
        run = record("new", int(palette_floors), 50, 20)
        run["eval"].update({"post_processing": "palette16", "fid_holdout_vs_train": 5.3, "fid_floor_palette": 9.9,
                            "coverage_share/Pong-v4": 1.0, "fid_game/Pong-v4": 20.0, "count_game/Pong-v4": 2048,
                            "coverage_share_snapshot/Pong-v4": 1.0, "fid_game_floor/Pong-v4": 6.5})
        if palette_floors:
            run["eval"]["fid_game_floor_palette/Pong-v4"] = 9.2
        return run

    assert yardstick([scored(False)]).splitlines()[-1].endswith("| 1.00 · 6.5 |")
    assert yardstick([scored(False), scored(True)]).splitlines()[-1].endswith("| 1.00 · 6.5 / 9.2 |")


def test_the_scale_table_scores_each_set_at_each_k_as_evaluate_does():
    from benchmarks.prc_scale import scores_at, table
    from src.quality_metrics import density_coverage, precision_recall

    real = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    fake = torch.randn(200, 8, generator=torch.Generator().manual_seed(1)) * 1.5
    assert scores_at(fake, real, 3) == {**precision_recall(fake, real), **density_coverage(fake, real, k=3)}
    lines = table({"a": fake, "b": real[:100]}, real, [3, 20]).splitlines()
    assert [line.split(" | ")[:2] for line in lines[2:]] == [["| a", "3"], ["| a", "20"], ["| b", "3"], ["| b", "20"]]
    wider = [float(x) for x in lines[3].strip("| ").split(" | ")[2:]]
    assert wider[0] >= float(lines[2].strip("| ").split(" | ")[2])  # larger balls: precision cannot fall

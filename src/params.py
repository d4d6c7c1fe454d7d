"""`params.yaml` as typed, validated objects: the one place that holds every default.

`load_params()` reads the file, rejects unknown keys, wrong types and impossible values before
any work starts (one `ParamsError` naming key, value and what is allowed), and returns a frozen
`Params`. `effective(params)` applies the `train.recipe` preset, so what runs is what is logged.
`set_params()` writes values back into a params.yaml, keeping its comments.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from src.atomic import replacing
from src.errors import UserError
from src.strict_yaml import strict_load
from src.validation_messages import describe_error

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = "params.yaml"
IMAGE_SHAPE = (3, 64, 64)  # channels first, as the article's wrapper produces
AUGMENTS = ("color", "translation", "cutout")
AUTO_POINTS = 5  # `auto` intervals give this many FID measurements and image grids per run


def parse_policy(policy: str) -> tuple[str, ...]:
    """`"color, cutout"` -> ("color", "cutout"); an unknown name is a ValueError naming the allowed ones."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    bad = [n for n in names if n not in AUGMENTS]
    if bad:
        raise ValueError(f"unknown augmentation {bad[0]!r}; allowed: {', '.join(AUGMENTS)} (comma-separated)")
    return names


class ParamsError(UserError):
    """A params.yaml that cannot run: the message names the key, its value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: Any) -> Any:
        # pydantic would read `train_frames: true` as 1; a yes/no where a number belongs is a mistake.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation is not bool and bool not in getattr(annotation, "__args__", ()):
            raise ValueError("expected a number, not true/false")
        return value


@functools.cache
def ale_game_ids() -> tuple[str, ...]:
    """Every Atari env id gymnasium knows once ale-py registered its ROMs (they ship inside ale-py)."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    return tuple(sorted(k for k, spec in gym.registry.items() if "ale_py" in str(spec.entry_point)))


def check_device(device: str) -> str:
    """`auto | cpu | cuda | cuda:N`, else a ValueError listing them (params keys and --device flags)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N")
    return device


DeviceName = Annotated[str, AfterValidator(check_device)]  # `auto | cpu | cuda | cuda:N`


class CollectParams(_Section):
    games: list[str] = Field(default_factory=lambda: ["Breakout-v4", "AirRaid-v4", "Pong-v4"], min_length=1)
    train_frames: int = Field(30_000, gt=0)
    holdout_frames: int = Field(6_000, gt=0)
    workers: int = Field(0, ge=0, description="worker processes; 0 = one per CPU core")
    shard_frames: int = Field(5_000, gt=0, description="env steps per work unit (one fresh env, one seed)")
    interpolation: Literal["linear", "area", "nearest", "cubic"] = "linear"
    min_mean: float = Field(0.01, ge=0, le=255, description="article's dark-frame filter, 0..255 scale")
    dedup: bool = True

    @field_validator("games")
    @classmethod
    def _known_games(cls, games: list[str]) -> list[str]:
        known = ale_game_ids()
        for game in games:
            if game not in known:
                close = difflib.get_close_matches(game, known, n=3, cutoff=0.5)
                hint = f"closest valid ids: {', '.join(close)}" if close else "see gymnasium's ALE ids, e.g. Pong-v4"
                raise ValueError(f"unknown game {game!r}; {hint}")
        if len(set(games)) != len(games):
            raise ValueError("each game may appear once")
        return games


class ModelParams(_Section):
    latent_dim: int = Field(100, gt=0)
    gen_filters: int = Field(32, gt=0)
    disc_filters: int = Field(32, gt=0)
    arch: Literal["dcgan", "resnet"] = Field(
        "dcgan", description="dcgan (the article's conv stacks) | resnet (residual blocks in G and D, no BN in D)"
    )
    upsample: Literal["transposed", "nearest", "bilinear"] = Field(
        "transposed", description="generator upsampling: transposed convs (the article's) | nearest or bilinear resize "
                                  "+ 3x3 conv"
    )
    skip_rgb: bool = Field(False, description="G paints RGB at 8, 16, 32 and 64 px and sums them (StyleGAN2 skips)")
    minibatch_std: int = Field(4, ge=0, description="D sees feature std over groups of N images; 0 = off")
    conditional: bool = Field(False, description="condition G and D on the game label")
    palette_size: int = Field(
        16, ge=0, le=256, description="drawn screens take the training frames' N commonest colours; 0 = off"
    )
    palette_head: Literal["none", "soft", "hard"] = Field(
        "none", description="G paints each pixel from the palette: soft = softmax mix of its colours, hard = the "
                            "likeliest colour (straight-through gradients); needs palette_size >= 2"
    )

    @field_validator("palette_size")
    @classmethod
    def _palette_size(cls, size: int) -> int:
        if size == 1:
            raise ValueError("a palette of 1 colour draws blank screens; use 0 (off) or 2..256")
        return size

    @model_validator(mode="after")
    def _palette_head_has_palette(self) -> ModelParams:
        if self.palette_head != "none" and self.palette_size < 2:
            raise ValueError(f"palette_head: {self.palette_head} needs a palette to paint from; palette_size is "
                             f"{self.palette_size}: set model.palette_size to 2..256 (16 is the default) or "
                             "palette_head to none")
        return self


class TrainParams(_Section):
    recipe: Literal["article", "custom"] = "custom"
    device: DeviceName = "auto"
    iterations: int = Field(95_000, gt=0)
    time_budget_s: float | None = Field(None, gt=0)
    batch_size: int = Field(32, gt=0)
    lr_g: float = Field(2.74e-4, gt=0, lt=1)
    lr_d: float = Field(1.42e-3, gt=0, lt=1)
    beta1: float = Field(0.064, ge=0, lt=1)
    beta2: float = Field(0.909, ge=0, lt=1)
    loss: Literal["bce", "hinge", "wgan-gp", "rpgan"] = "bce"
    gp_weight: float = Field(10.0, ge=0)
    r1_gamma: float = Field(0.1, ge=0, description="R1 penalty on real images (Mescheder et al. 2018); 0 = off")
    r2_gamma: float = Field(0.0, ge=0, description="R2: the same penalty on generated images; 0 = off")
    r1_every: int = Field(16, ge=1, description="lazy R1/R2: apply them every N steps, scaled by N (StyleGAN2)")
    gamma_end_fraction: float = Field(
        1.0, gt=0, le=1, description="R1/R2 gamma at the run's end as a fraction of its start (a half cosine); "
        "1 = constant"
    )
    d_steps: int = Field(1, ge=1, description="discriminator updates per generator update")
    d_activation: Literal["relu", "leaky_relu"] = "leaky_relu"
    init: Literal["default", "dcgan"] = "dcgan"
    spectral_norm: bool = False
    ema_decay: float = Field(0.999, ge=0, lt=1, description="0 = no EMA generator")
    ema_warmup: int = Field(1_000, ge=0, description="steps over which the EMA decay ramps up")
    ema_rampup: float = Field(
        0.0, ge=0, le=1, description="> 0: the EMA half-life, in images, is at most this fraction of the images seen "
        "(StyleGAN2-ADA's ramp; replaces ema_warmup); 0 = off"
    )
    lr_decay: Literal["none", "linear"] = Field(
        "none", description="linear: both learning rates fall linearly to 0 at train.iterations or train.time_budget_s"
    )
    augment: str = Field("", description="comma-separated subset of color,translation,cutout (DiffAugment)")
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool = True
    compile: bool = False
    cuda_graphs: bool = Field(True, description="replay each training step as one CUDA graph (CUDA, one process)")
    log_every: int = Field(50, gt=0)
    image_every: int | str = Field("auto", description=f"auto = train.iterations / {AUTO_POINTS}")
    checkpoint_every: int = Field(5_000, gt=0)
    fid_every: int | str = Field("auto", description=f"auto = train.iterations / {AUTO_POINTS}; 0 = no FID")
    fid_samples: int = Field(500, ge=2)

    @field_validator("image_every", "fid_every", mode="before")
    @classmethod
    def _every(cls, value: Any, info: Any) -> Any:
        low = 0 if info.field_name == "fid_every" else 1
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            return value
        raise ValueError(f"expected 'auto' or a whole number >= {low}")

    @field_validator("augment")
    @classmethod
    def _augment(cls, augment: str) -> str:
        return ",".join(parse_policy(augment))

    @property
    def penalty_gamma(self) -> float:
        """R1's and R2's gammas together: > 0 when a step regularises D (and D drops batch norm)."""
        return self.r1_gamma + self.r2_gamma

    @property
    def gamma_scheduled(self) -> bool:
        """Whether R1/R2's gamma falls over the run (`gamma_end_fraction` < 1 with a penalty on)."""
        return self.gamma_end_fraction < 1 and self.penalty_gamma > 0

    @property
    def budget_schedules(self) -> tuple[str, ...]:
        """The schedules that end at `iterations` / `time_budget_s`, as params.yaml sets them: under one of
        them another budget changes every step's lr or gamma, so a run cannot be extended."""
        schedules = []
        if self.lr_decay == "linear":
            schedules.append("train.lr_decay: linear")
        if self.gamma_scheduled:
            schedules.append(f"train.gamma_end_fraction: {self.gamma_end_fraction}")
        return tuple(schedules)


class EvaluateParams(_Section):
    num_samples: int = Field(2_048, ge=2, description="generated images for FID; < 2048 is biased")
    batch_size: int = Field(100, gt=0)
    kid_subset_size: int = Field(1_000, ge=2)
    inception_weights: str | None = Field(None, description="path to the torch-fidelity InceptionV3 weights")
    device: DeviceName = Field("auto", description="auto = the GPU when there is one")
    holdout_samples: int | None = Field(None, ge=2, description="holdout frames scored (a fixed subset); null = all")


class SearchRange(_Section):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        return self


def _default_space() -> dict[str, SearchRange]:
    return {
        "lr_g": SearchRange(low=2e-5, high=2e-3, log=True),
        "lr_d": SearchRange(low=2e-5, high=2e-3, log=True),
        "beta1": SearchRange(low=0.0, high=0.9),
        "beta2": SearchRange(low=0.9, high=0.9999),
    }


TUNED_KEYS = ("lr_g", "lr_d", "beta1", "beta2")


class TuneParams(_Section):
    n_trials: int = Field(20, gt=0)
    iterations: int = Field(1_000, gt=0, description="training iterations per trial")
    report_every: int = Field(250, gt=0, description="intermediate FID every N iterations (for pruning)")
    fid_samples: int = Field(500, ge=2)
    pruner: Literal["median", "hyperband", "none"] = "median"
    study_name: str = "atari-gan"
    storage: str | None = Field(None, description="Optuna storage URL; default sqlite:///optuna.db at the repo root")
    timeout_s: float | None = Field(None, gt=0)
    space: dict[str, SearchRange] = Field(default_factory=_default_space)

    @field_validator("space")
    @classmethod
    def _space_keys(cls, space: dict[str, SearchRange]) -> dict[str, SearchRange]:
        bad = sorted(set(space) - set(TUNED_KEYS))
        if bad:
            raise ValueError(f"cannot search {bad[0]!r}; allowed: {', '.join(TUNED_KEYS)}")
        for key in ("beta1", "beta2"):
            if key in space and not (0 <= space[key].low and space[key].high < 1):
                raise ValueError(f"{key} range must lie in [0, 1)")
        return space


class Params(_Section):
    seed: int = Field(0, ge=0)
    profile: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto = gpu when training runs on CUDA")
    # Values a profile sets over the rest (not collect: one snapshot serves both). The shipped cpu
    # profile lives in params.yaml; a file without `profiles` runs as written on any machine.
    profiles: dict[Literal["cpu", "gpu"], dict[Literal["model", "train", "evaluate", "tune"], dict[str, Any]]] = (
        Field(default_factory=dict)
    )
    collect: CollectParams = Field(default_factory=CollectParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    tune: TuneParams = Field(default_factory=TuneParams)


# The article's recipe, applied whole by `train.recipe: article` whatever else params.yaml says.
ARTICLE_MODEL = {"latent_dim": 100, "gen_filters": 64, "disc_filters": 64, "arch": "dcgan", "upsample": "transposed",
                 "skip_rgb": False, "minibatch_std": 0, "conditional": False, "palette_size": 0,
                 "palette_head": "none"}
ARTICLE_TRAIN = {
    "batch_size": 16,
    "lr_g": 1e-4,
    "lr_d": 1e-4,
    "beta1": 0.5,
    "beta2": 0.999,
    "loss": "bce",
    "d_steps": 1,
    "d_activation": "relu",
    "init": "default",
    "spectral_norm": False,
    "r1_gamma": 0.0,
    "r2_gamma": 0.0,
    "ema_decay": 0.0,
    "lr_decay": "none",
    "augment": "",
}


def effective(params: Params) -> Params:
    """The params that actually run: the `article` recipe overrides model and training settings,
    and `auto` intervals become numbers of steps. Applying it twice changes nothing."""
    train = params.train
    update = {k: max(1, train.iterations // AUTO_POINTS) for k in ("image_every", "fid_every")
              if getattr(train, k) == "auto"}
    if train.recipe == "article":
        params = params.model_copy(update={"model": params.model.model_copy(update=ARTICLE_MODEL)})
        update.update(ARTICLE_TRAIN)
    if not update:
        return params
    return params.model_copy(update={"train": train.model_copy(update=update)})


def _validate(raw: dict[str, Any], source: str) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [describe_error(e, raw, Params) for e in exc.errors()]
        if len(problems) == 1:
            raise ParamsError(f"{source}: {problems[0]}") from None
        raise ParamsError(f"{source} has {len(problems)} invalid values:\n  " + "\n  ".join(problems)) from None


def with_profile(params: Params, name: str) -> Params:
    """`params` with `profiles[name]`'s values applied and `profile` set to `name`."""
    raw = params.model_dump()
    for section, values in params.profiles.get(name, {}).items():
        raw[section] = {**raw[section], **values}
    raw["profile"] = name
    return _validate(raw, f"profiles.{name} in {PARAMS_FILE}")


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    """Validate a params mapping, each profile's values included; every problem is reported in one ParamsError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    params = _validate(raw, source)
    for name in params.profiles:
        with_profile(params, name)
    return params


def params_path() -> Path:
    """params.yaml in the working directory: stages run from a project folder (DVC runs them there).

    Never the installed package's own copy: a stage started elsewhere would read those params and
    write its outputs next to them.
    """
    return Path.cwd() / PARAMS_FILE


def load_params(path: str | os.PathLike | None = None) -> Params:
    given = path is not None
    path = Path(path) if given else params_path()
    try:
        raw = strict_load(path.read_text())  # a key given twice is an error, not the last one winning
    except FileNotFoundError:
        if not given:
            raise ParamsError(
                f"found no {PARAMS_FILE} here ({path.parent}); run the stage from a project folder "
                f"(the one holding dvc.yaml and {PARAMS_FILE}), or pass the path to a {PARAMS_FILE}"
            ) from None
        raise ParamsError(f"{path} not found; run from the repo root or pass the path to params.yaml") from None
    except IsADirectoryError:
        raise ParamsError(f"{path} is a folder, not a params file; pass the path to a {PARAMS_FILE}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {yaml_problem(exc)}") from None
    return parse_params(raw, source=str(path))


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (line, column), without PyYAML's excerpt of the text."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    hint = " (YAML indents with spaces, not tabs)" if "'\\t'" in problem else ""
    return f"{problem}{where}{hint}"


def set_params(path: str | os.PathLike, values: dict[str, Any]) -> None:
    """Set dotted keys (`{"train.lr_g": 1e-4}`) in a params.yaml, keeping its comments, order and layout; a
    missing section is added as a one-line mapping (`train: {lr_g: 0.0001}`).

    The new file is validated before it replaces the old one, atomically: a value the schema refuses
    raises `ParamsError` and leaves the file as it was.
    """
    from ruamel.yaml import YAML

    path = Path(path)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    # ruamel writes None as an empty value; keep params.yaml's explicit `null`s untouched.
    rt.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = rt.load(path.read_text())
    for key, value in values.items():
        *sections, name = key.split(".")
        node = data
        for section in sections:
            if node.get(section) is None:
                _add_flow_section(node, section)
            node = node[section]
        node[name] = value
    with replacing(path) as tmp:
        with open(tmp, "w") as fh:
            rt.dump(data, fh)
        load_params(tmp)  # never write a params.yaml that does not validate


def _add_flow_section(node: Any, section: str) -> None:
    """Append `section: {}` (one line) to ruamel mapping `node`. The blank lines after the last key ride on its
    comment, so they move to the new key: the new line stays inside its block, not after the gap."""
    import copy

    from ruamel.yaml.comments import CommentedMap

    comment = node.ca.items.get(next(reversed(node), None), [None] * 3)[2]
    node[section] = CommentedMap()
    node[section].fa.set_flow_style()
    if comment is not None and comment.value.endswith("\n\n"):
        body = comment.value.rstrip("\n")
        gap = comment.value[len(body) + 1:]
        comment.value = body + "\n"
        moved = copy.copy(comment)
        moved.value = "\n" + gap
        node.ca.items[section] = [None, None, moved, None]


def flatten(params: Params) -> dict[str, Any]:
    """`{"train.lr_g": 0.0002, ...}`: the form MLflow and Optuna log."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", params.model_dump())
    return out

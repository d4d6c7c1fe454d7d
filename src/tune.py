"""`python -m src.tune`: Optuna search over the learning rates and Adam betas.

Each trial trains the current recipe for `tune.iterations` steps on the snapshot with sampled
`train.lr_g`, `train.lr_d`, `train.beta1`, `train.beta2`, reports FID (cached real statistics)
every `tune.report_every` steps so the pruner can stop hopeless trials, and is tracked as a
nested MLflow run under one parent run per invocation. The study lives in an Optuna storage
(SQLite at the repo root by default), so rerunning continues it and several workers can share
it. `--apply` writes the best values into params.yaml, keeping its comments and layout.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

from src.errors import UserError, run_cli
from src.params import TUNED_KEYS, Params, effective, flatten, load_params, params_path, set_params

BEST_FILE = Path("tune/best_params.json")


class TuneError(UserError):
    pass


def default_storage() -> str:
    from src.tracking import repo_root

    return f"sqlite:///{repo_root() / 'optuna.db'}"


def make_storage(url: str, attempts: int = 5):
    """An Optuna storage; SQLite waits for locks so several worker processes can share one file."""
    import time

    import optuna
    import sqlalchemy.exc

    if not url.startswith("sqlite"):
        return url
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        except sqlalchemy.exc.SQLAlchemyError:
            # Two workers creating the same new database race on its schema; the loser retries.
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def make_pruner(name: str, report_every: int, iterations: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=report_every)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=report_every, max_resource=iterations)
    return optuna.pruners.NopPruner()


def load_study(params: Params, study_name: str, storage: str):
    import optuna

    sampler = optuna.samplers.TPESampler(seed=params.seed)
    pruner = make_pruner(params.tune.pruner, params.tune.report_every, params.tune.iterations)
    try:
        return optuna.create_study(
            study_name=study_name,
            storage=make_storage(storage),
            sampler=sampler,
            pruner=pruner,
            direction="minimize",
            load_if_exists=True,
        )
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
        return optuna.load_study(study_name=study_name, storage=make_storage(storage), sampler=sampler, pruner=pruner)


def suggest(trial, space) -> dict[str, float]:
    return {key: trial.suggest_float(key, r.low, r.high, log=r.log) for key, r in space.items()}


def trial_params(params: Params, values: dict[str, float]) -> Params:
    """The params one trial trains with: sampled values, the tuning budget, FID every report step."""
    tune = params.tune
    train = params.train.model_copy(
        update={
            **values,
            "iterations": tune.iterations,
            "fid_every": tune.report_every,
            "fid_samples": tune.fid_samples,
            "time_budget_s": None,
        }
    )
    return params.model_copy(update={"train": train})


def run_trial(trial, params: Params, snapshot, device) -> float:
    """Train one trial; FID is reported at each step and the trial pruned when the pruner says so."""
    import mlflow
    import optuna

    from src.fid import make_fid_fn
    from src.training import train_gan

    values = suggest(trial, params.tune.space)
    run_params = trial_params(params, values)
    if run_params.train.recipe == "article":
        raise TuneError(
            "train.recipe is 'article', which fixes lr and betas; set train.recipe: custom to tune them"
        )
    fid_of = make_fid_fn(snapshot, run_params, device)
    reported: list[float] = []

    def fid_fn(step: int, generator) -> float:
        fid = fid_of(step, generator)
        reported.append(fid)
        trial.report(fid, step)
        mlflow.log_metric("fid", fid, step=step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with FID {fid:.2f}")
        return fid

    with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
        mlflow.log_params({k: v for k, v in flatten(effective(run_params)).items() if k.startswith(("train.", "model."))})
        mlflow.set_tags({"optuna.trial": str(trial.number), "optuna.study": trial.study.study_name})
        try:
            with tempfile.TemporaryDirectory() as ckpt:
                result = train_gan(effective(run_params), snapshot, checkpoint_dir=Path(ckpt), fid_fn=fid_fn, progress=False)
        except optuna.TrialPruned:
            mlflow.set_tag("state", "pruned")
            raise
        except Exception as exc:
            mlflow.set_tags({"state": "failed", "error": str(exc)[:500]})
            raise
        best = min(reported) if reported else math.nan
        if result.best_fid is not None:
            best = result.best_fid
        mlflow.log_metrics({"best_fid": best, "iterations": result.iterations})
        mlflow.set_tag("state", "complete")
        return best


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m src.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-trials", type=int, help="trials to run now (default tune.n_trials)")
    parser.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    parser.add_argument("--study-name", help="default tune.study_name")
    parser.add_argument("--storage", help="Optuna storage URL (default tune.storage, else sqlite:///optuna.db)")
    parser.add_argument("--params", type=Path, help="params file (default ./params.yaml)")
    parser.add_argument("--apply", action="store_true", help="write the best values into params.yaml")
    args = parser.parse_args(argv)
    if args.n_trials is not None and args.n_trials <= 0:
        parser.error("--n-trials must be a positive integer")
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be a positive number of seconds")
    return args


def summary_table(study) -> str:
    import optuna

    rows = ["| trial | state | FID | " + " | ".join(TUNED_KEYS) + " |", "|---" * (3 + len(TUNED_KEYS)) + "|"]
    for t in study.trials:
        value = f"{t.value:.2f}" if t.value is not None else (
            f"({t.intermediate_values[max(t.intermediate_values)]:.2f})" if t.intermediate_values else "-"
        )
        cells = [f"{t.params[k]:.3g}" if k in t.params else "-" for k in TUNED_KEYS]
        rows.append(f"| {t.number} | {t.state.name.lower()} | {value} | " + " | ".join(cells) + " |")
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    if complete:
        rows.append(f"\nbest: trial {study.best_trial.number}, FID {study.best_value:.2f}, {study.best_params}")
        first = study.trials[0]
        if first.value is not None and first.system_attrs.get("fixed_params"):
            rows.append(f"trial 0 (the params.yaml values) FID {first.value:.2f}: best is "
                        f"{first.value - study.best_value:.2f} lower ({study.best_value / first.value:.2f}x)")
    return "\n".join(rows)


def log_plots(study) -> None:
    """Optimisation plots as images in the parent run (matplotlib backend; plotly is not needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import optuna
    import optuna.visualization.matplotlib as ovm

    plots = {"optimization_history": ovm.plot_optimization_history, "slice": ovm.plot_slice}
    if len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) >= 2:
        plots["param_importances"] = ovm.plot_param_importances
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = plot(study)
        except Exception as exc:  # a plot that cannot be drawn for this study is skipped, not fatal
            print(f"skipped plot {name}: {exc}")
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        mlflow.log_figure(fig, f"optuna/{name}.png")
        plt.close(fig)


def apply_best(path: Path, best: dict[str, float]) -> None:
    """Set train.<key> for the tuned keys in params.yaml, keeping comments, order and layout."""
    set_params(path, {f"train.{key}": float(f"{value:.6g}") for key, value in best.items()})


def tune(params: Params, *, n_trials: int, timeout: float | None, study_name: str, storage: str) -> Any:
    import mlflow
    import optuna

    from src import tracking
    from src.atomic import write_json_atomic
    from src.data import load_snapshot
    from src.device import resolve_device

    snapshot = load_snapshot()
    device = resolve_device(params.train.device)
    study = load_study(params, study_name, storage)
    before = len(study.trials)
    if before == 0:
        # A new study starts from the current params.yaml values, so the gain over them is measured.
        study.enqueue_trial({key: getattr(params.train, key) for key in params.tune.space})

    def progress(study, trial) -> None:
        value = "-" if trial.value is None else f"{trial.value:.2f}"
        print(f"trial {trial.number}: {trial.state.name.lower()}  FID {value}  {trial.params}", flush=True)

    tracking.setup()
    with mlflow.start_run(run_name=f"tune-{study_name}", tags={**tracking.run_tags(), "optuna.study": study_name}):
        mlflow.log_params({"tune.n_trials": n_trials, "tune.iterations": params.tune.iterations,
                           "tune.pruner": params.tune.pruner, "tune.storage": storage.split("@")[-1]})
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(
            lambda trial: run_trial(trial, params, snapshot, device),
            n_trials=n_trials,
            timeout=timeout,
            catch=(Exception,),
            callbacks=[progress],
        )
        print(summary_table(study))
        complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
        mlflow.log_metric("trials_run", len(study.trials) - before)
        if complete:
            best = study.best_trial
            mlflow.log_metrics({"best_fid": best.value, "best_trial": best.number})
            mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
            write_json_atomic(BEST_FILE, {"study": study_name, "trial": best.number, "fid": best.value,
                                          "params": {f"train.{k}": v for k, v in best.params.items()}})
            print(f"best parameters written to {BEST_FILE}")
        log_plots(study)
    return study


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = args.params or params_path()
    params = load_params(path)
    study = tune(
        params,
        n_trials=args.n_trials or params.tune.n_trials,
        timeout=args.timeout or params.tune.timeout_s,
        study_name=args.study_name or params.tune.study_name,
        storage=args.storage or params.tune.storage or default_storage(),
    )
    if args.apply:
        import optuna

        if not study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
            raise TuneError("no trial has completed yet, so there is nothing to --apply")
        apply_best(path, study.best_params)
        print(f"wrote best {', '.join(study.best_params)} into {path}")


if __name__ == "__main__":
    run_cli(main)

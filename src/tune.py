"""`python -m src.tune`: Optuna search over the learning rates and Adam betas.

Each trial trains the current recipe for `tune.iterations` steps on the snapshot with sampled
`train.lr_g`, `train.lr_d`, `train.beta1`, `train.beta2`, reports FID (cached real statistics)
every `tune.report_every` steps so the pruner can stop hopeless trials, and is tracked as a
nested MLflow run under one parent run per invocation. The study lives in an Optuna storage
(SQLite at the repo root by default, or a shared PostgreSQL database; src/study.py), so rerunning
continues it and many workers on many machines can share it. Configuration problems stop the command before
any trial; `--apply` writes the best values into params.yaml, keeping its comments and layout.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from src.errors import UserError, run_cli, stage_parser
from src.lock import project_lock
from src.params import TUNED_KEYS, Params, effective, flatten, load_params, params_path, set_params
from src.profile import apply_profile
from src.study import (
    BASELINE_ATTR,
    STORAGE_EXAMPLES,
    TuneError,
    default_storage,
    enqueue_baseline,
    load_study,
    make_storage,
)

BEST_FILE = Path("tune/best_params.json")


class TuneInterrupted(UserError):
    """Ctrl-C (SIGINT) during a study: exit 130, saying how to continue it."""

    exit_code = 130

    def __init__(self, study_name: str, storage: str, complete: int) -> None:
        kept = f"its {complete} completed trials are kept" + (f" (best in {BEST_FILE})" if complete else "")
        super().__init__(
            f"tuning interrupted; study {study_name!r} in {storage.split('@')[-1]}: {kept}. Continue it with "
            f"`python -m src.tune` and the same storage and study name (--storage, --study-name, or params.yaml's)"
        )


def suggest(trial, space) -> dict[str, float]:
    return {key: trial.suggest_float(key, r.low, r.high, log=r.log) for key, r in space.items()}


def trial_params(params: Params, values: dict[str, float]) -> Params:
    """The params one trial trains with (resolved: `effective`): sampled values, the tuning budget, FID every
    report step."""
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
    return effective(params.model_copy(update={"train": train}))


def check_config(params: Params, storage: str) -> None:
    """Everything a trial would trip over that no trial can change; raises before the study is touched."""
    from src.device import resolve_device
    from src.inception import build_inception, resolve_inception_weights

    if params.train.recipe == "article":
        raise TuneError("train.recipe is 'article', which fixes lr and betas; set train.recipe: custom to tune them")
    resolve_device(params.train.device)
    build_inception(resolve_inception_weights(params.evaluate.inception_weights))
    make_storage(storage)


def trial_failure_types() -> tuple[type[Exception], ...]:
    """User errors that belong to one trial's sampled values (the study goes on after them)."""
    from src.inception import FIDInputError
    from src.training import NonFiniteLossError

    return (NonFiniteLossError, FIDInputError)


def run_trial(trial, params: Params, snapshot, fid_of: Callable, show: Callable | None = None) -> float:
    """Train one trial; FID is reported at each step and the trial pruned when the pruner says so.

    The baseline trial (the params.yaml values) is never pruned: its FID is the yardstick.
    `show(step=..., fid=...)` is told the progress.
    """
    import mlflow
    import optuna

    from src.training import train_gan

    values = suggest(trial, params.tune.space)
    run_params = trial_params(params, values)
    baseline = bool(trial.user_attrs.get(BASELINE_ATTR))
    reported: list[float] = []
    show = show or (lambda **_: None)

    def fid_fn(step: int, generator) -> float:
        fid = fid_of(step, generator)
        reported.append(fid)
        show(step=step, fid=fid)
        trial.report(fid, step)
        mlflow.log_metric("fid", fid, step=step)
        if not baseline and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with FID {fid:.2f}")
        return fid

    with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
        mlflow.log_params({k: v for k, v in flatten(run_params).items() if k.startswith(("train.", "model."))})
        mlflow.set_tags({"optuna.trial": str(trial.number), "optuna.study": trial.study.study_name,
                         "optuna.baseline": str(baseline).lower()})
        try:
            with tempfile.TemporaryDirectory() as ckpt:
                result = train_gan(run_params, snapshot, checkpoint_dir=Path(ckpt), fid_fn=fid_fn,
                                   log_fn=lambda step, _: show(step=step), progress=False)
        except optuna.TrialPruned:
            mlflow.set_tag("state", "pruned")
            raise
        except BaseException as exc:
            mlflow.set_tags({"state": "failed", "error": str(exc)[:500]})
            raise
        best = min(reported) if reported else math.nan
        if result.best_fid is not None:
            best = result.best_fid
        mlflow.log_metrics({"best_fid": best, "iterations": result.iterations})
        mlflow.set_tag("state", "complete")
        return best


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("python -m src.tune", __doc__)
    parser.add_argument("--n-trials", type=int, help="trials to run now (default tune.n_trials; none with --apply alone)")
    parser.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    parser.add_argument("--study-name", help="default tune.study_name")
    parser.add_argument("--storage", help=f"Optuna storage URL, e.g. {STORAGE_EXAMPLES} "
                                          "(default tune.storage, else sqlite:///optuna.db at the repo root)")
    parser.add_argument("--params", type=Path, help="params file (default ./params.yaml)")
    parser.add_argument("--apply", action="store_true",
                        help="write the study's best values into params.yaml (alone: no new trial)")
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
        mark = " (params.yaml)" if t.user_attrs.get(BASELINE_ATTR) else ""
        rows.append(f"| {t.number}{mark} | {t.state.name.lower()} | {value} | " + " | ".join(cells) + " |")
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    if complete:
        rows.append(f"\nbest: trial {study.best_trial.number}, FID {study.best_value:.2f}, {study.best_params}")
        base = [t for t in complete if t.user_attrs.get(BASELINE_ATTR)]
        if base:
            rows.append(f"trial {base[0].number} (the params.yaml values) FID {base[0].value:.2f}: best is "
                        f"{base[0].value - study.best_value:.2f} lower ({study.best_value / base[0].value:.2f}x)")
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


def apply_section(params: Params) -> str:
    """Where --apply writes: `profiles.<profile>.train` when params.yaml has a section for the profile the study
    ran under (so the values take effect for that profile, and only it: a CPU study does not move the GPU's
    top level), else the top-level `train`, which that profile then runs."""
    return f"profiles.{params.profile}.train" if params.profile in params.profiles else "train"


def apply_best(path: Path, best: dict[str, float], section: str = "train") -> None:
    """Set <section>.<key> for the tuned keys in params.yaml, keeping comments, order and layout."""
    set_params(path, {f"{section}.{key}": float(f"{value:.6g}") for key, value in best.items()})


class Progress:
    """Two tqdm bars: the study (trials, best FID so far, ETA) and the running trial (steps, FID)."""

    def __init__(self, n_trials: int, iterations: int) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.iterations = iterations
        self.study = tqdm(total=n_trials, desc="study", unit="trial", position=0, dynamic_ncols=True)
        self.trial = None

    def start_trial(self, number: int) -> None:
        self.trial = self._tqdm(total=self.iterations, desc=f"trial {number}", unit="it", position=1,
                                leave=False, dynamic_ncols=True, mininterval=0.5)

    def show(self, step: int, fid: float | None = None) -> None:
        if self.trial is not None:
            self.trial.update(max(0, step - self.trial.n))
            if fid is not None:
                self.trial.set_postfix(fid=f"{fid:.2f}")

    def end_trial(self, line: str, best: float | None) -> None:
        if self.trial is not None:
            self.trial.close()
            self.trial = None
        self._tqdm.write(line)
        if best is not None:
            self.study.set_postfix(best_fid=f"{best:.2f}")
        self.study.update(1)

    def close(self) -> None:
        if self.trial is not None:
            self.trial.close()
        self.study.close()


def optimize(study, params: Params, snapshot, fid_of: Callable, *, n_trials: int, timeout: float | None) -> None:
    """Run trials; a failed baseline is put back in the queue, a configuration error stops everything."""
    import optuna

    from src.training import TrainingInterrupted

    stop: list[UserError] = []
    per_trial = trial_failure_types()
    bar = Progress(n_trials, params.tune.iterations)

    def objective(trial) -> float:
        bar.start_trial(trial.number)
        try:
            return run_trial(trial, params, snapshot, fid_of, show=bar.show)
        except optuna.TrialPruned:
            raise
        except BaseException as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            if trial.user_attrs.get(BASELINE_ATTR):
                enqueue_baseline(trial.study, params)  # run it again until it completes
            if isinstance(exc, TrainingInterrupted):  # the trial's training caught the signal (Ctrl-C)
                raise KeyboardInterrupt from None  # optuna records the trial as failed and stops
            if isinstance(exc, UserError) and not isinstance(exc, per_trial):
                stop.append(exc)
                trial.study.stop()
            raise

    def report(study, trial) -> None:
        value = "-" if trial.value is None else f"{trial.value:.2f}"
        reason = [trial.user_attrs["error"]] if trial.state.name == "FAIL" and "error" in trial.user_attrs else []
        best = None
        with contextlib.suppress(ValueError):
            best = study.best_value
        bar.end_trial(f"trial {trial.number}: {trial.state.name.lower()}  FID {value}  {trial.params}"
                      + (f"  ({reason[0]})" if reason else ""), best)

    try:
        study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(Exception,), callbacks=[report])
    finally:
        bar.close()
    if stop:
        raise TuneError(str(stop[0]))


def tune(params: Params, *, n_trials: int, timeout: float | None, study_name: str, storage: str) -> Any:
    import mlflow
    import optuna

    from src import tracking
    from src.atomic import write_json_atomic
    from src.data import load_snapshot
    from src.device import resolve_device
    from src.fid import make_fid_fn
    from src.training.loop import check_snapshot

    snapshot = load_snapshot()
    tracking.check_store()  # before any work (and the study storage): a store that cannot be used costs nothing
    check_snapshot(snapshot, params.train.batch_size)
    check_config(params, storage)
    # One FID function for every trial: the Inception model and the real statistics load once.
    fid_of = make_fid_fn(snapshot, trial_params(params, {}), resolve_device(params.train.device))
    study = load_study(params, study_name, storage)
    before = sum(t.state != optuna.trial.TrialState.WAITING for t in study.trials)  # not the queued baseline
    if before:
        print(f"continuing study {study_name!r} ({before} trials so far)", flush=True)

    tracking.setup()
    interrupted = False
    with mlflow.start_run(run_name=f"tune-{study_name}", tags={**tracking.run_tags(), "optuna.study": study_name}):
        mlflow.log_params({"tune.n_trials": n_trials, "tune.iterations": params.tune.iterations,
                           "tune.pruner": params.tune.pruner, "tune.storage": storage.split("@")[-1]})
        try:
            optimize(study, params, snapshot, fid_of, n_trials=n_trials, timeout=timeout)
        except KeyboardInterrupt:  # Ctrl-C: keep what the finished trials found, then say how to go on
            interrupted = True
            mlflow.set_tag("state", "interrupted")
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
        if not interrupted:
            log_plots(study)
    if interrupted:
        raise TuneInterrupted(study_name, storage, len(complete))
    return study


def apply_study_best(study, path: Path, params: Params) -> None:
    import optuna

    if not study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        raise TuneError(f"no trial of study {study.study_name!r} has completed yet, so there is nothing to "
                        "--apply; run trials first: `python -m src.tune`")
    section = apply_section(params)
    apply_best(path, study.best_params, section)
    print(f"wrote best {', '.join(study.best_params)} (trial {study.best_trial.number}, "
          f"FID {study.best_value:.2f}) into {path} under {section} (profile {params.profile})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("src").setLevel(logging.INFO)  # our messages (the profile); not every library's
    params = apply_profile(load_params(args.params))
    path = args.params or params_path()
    study_name = args.study_name or params.tune.study_name
    storage = args.storage or params.tune.storage or default_storage()
    if args.apply and args.n_trials is None:  # --apply alone: use the study as it is
        with project_lock():
            apply_study_best(load_study(params, study_name, storage, create=False), path, params)
        return
    with project_lock(shared=not args.apply):  # workers share a study; --apply rewrites params.yaml
        study = tune(params, n_trials=args.n_trials or params.tune.n_trials,
                     timeout=args.timeout or params.tune.timeout_s, study_name=study_name, storage=storage)
        if args.apply:
            apply_study_best(study, path, params)


if __name__ == "__main__":
    run_cli(main)

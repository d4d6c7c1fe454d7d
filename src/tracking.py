"""MLflow: where runs go, checking that store before any work, and the train stage's run.

By default runs live in `<repo>/mlflow.db` and artifacts in `<repo>/mlruns/`, so `mlflow ui` started
at the repo root shows everything. The root is anchored even when DVC runs a queued experiment in a
temporary copy under `.dvc/tmp/exps/`, so those runs land in the same database. With
`MLFLOW_TRACKING_URI=http(s)://...` (a team's `mlflow server`), the server chooses where artifacts
go (`--artifacts-destination`): nothing is written to this clone's `mlruns/` (docs/team.md).

Every stage that logs calls `check_store()` before its work (a store it cannot use is one clear
error, nothing changed); a store that fails after the work is done costs a warning, not the work.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from src.errors import UserError
from src.paths import repo_root

if TYPE_CHECKING:
    import torch

    from src.data import Snapshot
    from src.params import Params
    from src.training.loop import TrainResult

log = logging.getLogger(__name__)

EXPERIMENT = "atari-gan"
EXPERIMENT_ENV = "ATARI_GAN_EXPERIMENT"  # another experiment name, e.g. when `atari-gan` is a local one
TIMEOUT_ENV = "ATARI_GAN_TRACKING_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 5.0
# MLflow's own defaults retry an unreachable server 7 times with backoff factor 2 (seen: 249 s before
# the error). Bounded here unless the user sets them: ~7 s of back-off, 30 s per request.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(UserError):
    pass


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or EXPERIMENT


def is_server(uri: str) -> bool:
    """A tracking server (which stores artifacts itself), as opposed to a database this process opens."""
    return uri.startswith(("http://", "https://"))


def shown(uri: str) -> str:
    """`uri` without a password, for messages."""
    return re.sub(r"//([^/@:]+):[^/@]*@", r"//\1:***@", uri)


@contextlib.contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a SQLite tracking database across processes.

    MLflow creates and migrates the schema on first connection; two processes doing it at once
    (parallel tuning workers, queued DVC experiments) corrupt each other's migration.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.cache
def _setup(uri: str, experiment: str, artifact_root: str) -> str:
    with _creation_lock(uri):
        return _get_or_create_experiment(uri, experiment, artifact_root)


def _is_local_path(location: str) -> bool:
    return location.startswith(("file:", "/")) or not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", location)


def check_experiment(uri: str, experiment: Any) -> None:
    """Refuse an experiment the team cannot use: deleted, or (on a server) keeping artifacts on one client's disk."""
    other_name = f"set {EXPERIMENT_ENV}=<another name> to use a new experiment"
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {experiment.name!r} on {shown(uri)} is deleted: restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or {other_name}")
    if is_server(uri) and _is_local_path(experiment.artifact_location):
        raise TrackingError(
            f"experiment {experiment.name!r} on {shown(uri)} stores its artifacts at {experiment.artifact_location}, "
            "a folder on one machine that teammates and the server cannot read (it was created by a client "
            f"tracking locally); {other_name}, whose artifacts the server stores, or rename that one "
            f"(`mlflow experiments rename --experiment-id {experiment.experiment_id} --new-name <old name>`)")


def _get_or_create_experiment(uri: str, experiment: str, artifact_root: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        check_experiment(uri, found)
        return found.experiment_id
    # A server stores artifacts where its --artifacts-destination says; a local store under mlruns/.
    location = None if is_server(uri) else f"{artifact_root}/{experiment}"
    try:
        return mlflow.create_experiment(experiment, artifact_location=location)
    except Exception:  # another process created it first
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def setup(experiment: str | None = None) -> str:
    """Point MLflow at the tracking store and return the experiment id (creating it once)."""
    import mlflow

    uri = tracking_uri()
    experiment_id = _setup(uri, experiment or experiment_name(), (repo_root() / "mlruns").as_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# Checking the store before any work, and failures after it ------------------------------------------

def store_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0 or not math.isfinite(value):
        raise TrackingError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds above 0; set e.g. {TIMEOUT_ENV}=5")
    return value


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def explain(uri: str, exc: BaseException, timeout_s: float) -> str:
    """One line naming the store, what went wrong and the fix."""
    where, message = shown(uri), str(exc)
    status = getattr(exc, "get_http_status_code", lambda: None)()
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401 and not user:
        return (f"the tracking server {where} asks for a login and none is set: set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (docs/team.md)")
    if status == 401:
        return (f"the tracking server {where} refused the login of user {user!r}: check MLFLOW_TRACKING_PASSWORD, or "
                "ask the server's admin to create the user")
    if status == 403:
        return (f"user {user!r} may not write experiment {experiment_name()!r} on {where}: ask the server's admin for "
                f"EDIT permission, or set {EXPERIMENT_ENV} to an experiment you may write")
    if is_server(uri) and ("failed with exception" in message or "timed out" in message.lower()):
        reason = re.search(r"\[Errno -?\d+\] [^\"')(]+|[Rr]ead timed out|timed out|Name or service not known", message)
        return (f"cannot reach the tracking server {where} within {timeout_s:g} s "
                f"({reason.group(0).strip() if reason else _one_line(message, 120)}): start it (docs/team.md), fix "
                "MLFLOW_TRACKING_URI, or unset it to track in this clone's mlflow.db; nothing was changed")
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return (f"the tracking database {path} cannot be used ({_one_line(message, 160)}): move it away (e.g. `mv "
                f"{path} {path}.broken`) to start a new one, or restore it from a backup; nothing was changed")
    return (f"the tracking store {where} cannot be used ({type(exc).__name__}: {_one_line(message, 200)}); fix it or "
            "MLFLOW_TRACKING_URI (unset: this clone's mlflow.db); nothing was changed")


def bound_http_retries() -> None:
    """Bound MLflow's HTTP retries for the rest of the process (values the user set win)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def check_store() -> str:
    """Reach the tracking store and its experiment before any work (within ATARI_GAN_TRACKING_TIMEOUT_S).

    Returns the experiment id; raises TrackingError, one line naming the store and the fix, if the
    store cannot be used (unreachable, refusing, no or wrong login, a corrupt database, an unusable
    experiment).
    """
    uri = tracking_uri()
    timeout = store_timeout()
    bound_http_retries()
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout)))}
    try:
        with _environ(quick):
            experiment_id = setup()
    except TrackingError:
        raise
    except Exception as exc:  # MLflow, requests and SQLAlchemy each raise their own
        raise TrackingError(explain(uri, exc, timeout)) from None
    log.info("tracking: %s, experiment %s", shown(uri), experiment_name())
    return experiment_id


def store_errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises (not our own bugs), for logging that must not cost the work."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, RequestException, SQLAlchemyError, OSError


def warn_failed(what: str, exc: BaseException, relog: str) -> None:
    """The one line a stage prints when tracking fails after its work: the work stays, and how to log it again."""
    print(f"warning: tracking to {shown(tracking_uri())} failed {what} ({_one_line(str(exc), 200)}); "
          f"the outputs are written and kept; to log them, fix the store and {relog}", file=sys.stderr, flush=True)


def logged_after_work(fn: Callable[..., Any], *args: Any, what: str, relog: str, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, or None with `warn_failed` if the tracking store fails."""
    try:
        return fn(*args, **kwargs)
    except store_errors() as exc:
        warn_failed(what, exc, relog)
        return None


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_tags() -> dict[str, str]:
    """Tags every run carries: code version and, when DVC runs the stage, the experiment name."""
    tags = {"git_commit": git_commit()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


class TrainingRun:
    """The stage's MLflow run: one per training, resumed with the training when params match.

    A store that fails once the run has started is reported once (`failed`) and logging stops:
    training and its outputs go on.
    """

    RELOG = ("run `dvc repro --force --single-item train` (it resumes from the finished checkpoint in "
             "checkpoints/train/, trains nothing and logs the run again)")

    def __init__(self, params: Params, snapshot: Snapshot, device: torch.device, world: int, resume_id: str | None):
        self.failed: str | None = None
        try:
            self._start(params, snapshot, device, world, resume_id)
        except store_errors() as exc:  # before any work: a clear error, like check_store's
            raise TrackingError(explain(tracking_uri(), exc, store_timeout())) from None

    def _start(self, params: Params, snapshot: Snapshot, device: torch.device, world: int,
               resume_id: str | None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        from src.device import device_label
        from src.params import flatten

        self.experiment_id = setup()
        self.client = MlflowClient()
        flat = {k: str(v) for k, v in flatten(params).items()}
        run_id = resume_id if resume_id and self._same_params(resume_id, flat) else None
        tags = {
            **run_tags(),
            "snapshot_sha256": snapshot.sha256,
            "device": device_label(device),
            "recipe": params.train.recipe,
            "profile": params.profile,
            "world_size": str(world),
        }
        if resume_id and run_id is None:
            tags["resumed_from_run"] = resume_id
        system = importlib.util.find_spec("psutil") is not None
        self.run = mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id, tags=tags,
                                    log_system_metrics=system)
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params(flatten(params))
        else:
            log.info("continuing MLflow run %s", run_id)

    def _same_params(self, run_id: str, flat: dict[str, str]) -> bool:
        try:
            logged = self.client.get_run(run_id).data.params
        except Exception:  # deleted run or another database
            return False
        return logged == flat

    def _logged(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        if self.failed is not None:
            return
        try:
            fn(*args)
        except store_errors() as exc:
            self.failed = what
            warn_failed(f"{what} of MLflow run {self.run_id}", exc, self.RELOG)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._logged("logging metrics", self._log_metrics, step, metrics)

    def log_images(self, step: int, real: torch.Tensor, fake: torch.Tensor) -> None:
        self._logged("logging images", self._log_images, step, real, fake)

    def finish(self, result: TrainResult, params: Params, written: dict[str, Path]) -> None:
        self._logged("logging the final metrics and artifacts", self._finish, result, params, written)

    def end(self, status: str) -> None:
        import mlflow

        self._logged(f"ending as {status}", mlflow.end_run, status)
        if self.failed is not None:
            with contextlib.suppress(Exception):  # forget the broken run, so nothing retries it at exit
                mlflow.end_run(status)

    def _log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def _log_images(self, step: int, real: torch.Tensor, fake: torch.Tensor) -> None:
        import mlflow
        from torchvision.utils import make_grid

        for key, batch in (("real", real), ("fake", fake)):
            grid = make_grid(batch, nrow=8, padding=2).permute(1, 2, 0).numpy()
            mlflow.log_image(grid, key=key, step=step)

    def _finish(self, result: TrainResult, params: Params, written: dict[str, Path]) -> None:
        import mlflow
        import mlflow.pytorch
        import numpy as np
        import torch

        from src.models import Generator, cpu_state, model_kwargs

        final = {"images_per_s": result.images_per_s, "train_seconds": result.elapsed_s}
        if result.best_fid is not None:
            final.update(best_fid=result.best_fid)
        self._log_metrics(result.iterations, final)
        for name in ("metrics", "losses.csv", "fid.csv", "samples.png"):
            if name in written:
                mlflow.log_artifact(str(written[name]), artifact_path="train")
        # Logged from a fresh CPU copy in fp32 and contiguous layout, so the exported model loads anywhere.
        gen = Generator(**model_kwargs(params)["generator"])
        gen.load_state_dict(cpu_state(result.eval_generator))
        gen.eval()
        # A batch of 4: torch.export would specialise a batch dimension of 1 and accept nothing else.
        example = torch.randn(4, params.model.latent_dim, 1, 1, generator=torch.Generator().manual_seed(0)).numpy()
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
        mlflow.pytorch.log_model(gen, name="generator", input_example=example, pip_requirements=requirements)

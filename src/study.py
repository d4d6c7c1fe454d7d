"""The Optuna study `python -m src.tune` searches in: its storage, sampler, pruner and baseline trial.

The study lives in an Optuna RDB storage: SQLite at the repo root by default, or a shared
PostgreSQL database (`postgresql://` means psycopg 3, the driver the project installs), so
rerunning continues it and many workers on many machines share it. A bad storage URL, a missing
driver or folder, or an unreachable server is a `TuneError` saying how to fix it. The sampler is
TPE seeded per trial from (seed, trial number), so a trial's suggestions do not depend on which
worker runs it; the study's creator, and only it, enqueues the params.yaml values as the first
(baseline) trial.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from src.errors import UserError
from src.params import Params

BASELINE_ATTR = "baseline"  # user attribute marking the trial that runs the params.yaml values
STORAGE_EXAMPLES = "sqlite:///optuna.db or postgresql://user:password@host:5432/dbname"


class TuneError(UserError):
    pass


def default_storage() -> str:
    from src.paths import repo_root

    return f"sqlite:///{repo_root() / 'optuna.db'}"


def storage_url(url: str) -> str:
    """`postgresql://` means psycopg 3 (the driver the project installs), not SQLAlchemy's psycopg2."""
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


def make_storage(url: str, attempts: int = 5):
    """An Optuna RDB storage for `url`, or a TuneError saying what is wrong with it and how to fix it.

    SQLite waits for locks, and workers that race to create the same new database retry.
    """
    import optuna
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    url = storage_url(url)
    try:
        parsed = make_url(url)
        shown = parsed.render_as_string(hide_password=True)
        parsed.get_dialect().import_dbapi()  # the driver, so a missing one is named here
    except sqlalchemy.exc.NoSuchModuleError:
        raise TuneError(
            f"storage {shown}: unknown database kind {parsed.drivername!r}; use {STORAGE_EXAMPLES}"
        ) from None
    except sqlalchemy.exc.ArgumentError:
        raise TuneError(f"storage {url!r} is not a database URL; use {STORAGE_EXAMPLES}") from None
    except ImportError as exc:
        raise TuneError(
            f"storage {shown} needs the Python driver {exc.name or parsed.drivername!r}, which is not installed; "
            "for PostgreSQL: pip install 'psycopg[binary]'"
        ) from None
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and parsed.database and not Path(parsed.database).parent.is_dir():
        raise TuneError(f"storage {shown}: the folder {Path(parsed.database).parent} does not exist; "
                        "create it or choose another path")
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            # Two workers creating the same new database race on its schema; the loser retries (SQLite:
            # a lock; PostgreSQL: a duplicate type or table). Not a server that cannot be reached.
            schema_race = sqlite or isinstance(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError))
            if attempt == attempts - 1 or not schema_race:
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                raise TuneError(f"cannot open the study storage {shown} ({reason}); check the URL, "
                                "that the database server runs and the database exists") from None
            time.sleep(0.5 * (attempt + 1))


def trial_seed(study_seed: int, trial_number: int) -> int:
    """A sampler seed for one trial: unique per (study seed, trial number), whichever worker runs it."""
    import numpy as np

    return int(np.random.SeedSequence([study_seed, trial_number]).generate_state(1)[0])


def make_sampler(study_seed: int):
    """TPE whose randomness for trial N is seeded from (seed, N).

    One `TPESampler(seed=s)` per process makes every worker (and every rerun) propose the same
    points in the same order; trial numbers are unique in a study, so these seeds never repeat.
    """
    import optuna

    def tpe(seed: int):
        # constant_liar: running trials count as bad, so parallel workers spread out.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)

    class PerTrialSeedSampler(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._inner = tpe(study_seed)

        def before_trial(self, study, trial) -> None:
            self._inner = tpe(trial_seed(study_seed, trial.number))
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self._inner.after_trial(study, trial, state, values)

    return PerTrialSeedSampler()


def make_pruner(name: str, report_every: int, iterations: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=report_every)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=report_every, max_resource=iterations)
    return optuna.pruners.NopPruner()


def baseline_values(params: Params) -> dict[str, float]:
    return {key: getattr(params.train, key) for key in params.tune.space}


def enqueue_baseline(study, params: Params) -> None:
    study.enqueue_trial(baseline_values(params), user_attrs={BASELINE_ATTR: True})


def load_study(params: Params, study_name: str, storage: str, *, create: bool = True):
    """The study, created when missing (its creator, and only it, enqueues the params.yaml baseline)."""
    import optuna

    from sqlalchemy.engine import make_url

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # src.tune prints each event once itself
    missing = f"no study named {study_name!r} in {storage_url(storage).split('@')[-1]}; run `python -m src.tune` " \
              "first (or pass --study-name/--storage of an existing one)"
    if not create and storage.startswith("sqlite:///") and not Path(make_url(storage).database or "").is_file():
        raise TuneError(missing)  # opening it would create an empty database file
    rdb = make_storage(storage)
    kwargs = {"sampler": make_sampler(params.seed),
              "pruner": make_pruner(params.tune.pruner, params.tune.report_every, params.tune.iterations)}
    with contextlib.suppress(KeyError):
        return optuna.load_study(study_name=study_name, storage=rdb, **kwargs)
    if not create:
        raise TuneError(missing)
    try:
        study = optuna.create_study(study_name=study_name, storage=rdb, direction="minimize", **kwargs)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
        return optuna.load_study(study_name=study_name, storage=rdb, **kwargs)
    # A new study starts from the current params.yaml values, so the gain over them is measured.
    enqueue_baseline(study, params)
    print(f"created study {study_name!r}; its first trial runs the params.yaml values", flush=True)
    return study

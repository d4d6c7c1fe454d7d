"""Stage `train`: params.yaml -> snapshot -> `src.training.train_gan` -> outputs -> MLflow.

The training itself lives in `src/training/` (see its modules); this module only wires the stage:
it joins a torchrun process group when there is one, resumes the MLflow run of a matching
checkpoint, and on rank 0 writes the DVC outputs and finishes the run. A signal leaves a
checkpoint and exits with 128 + the signal number.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from src.atomic import check_can_create
from src.data import check_collect_params, load_snapshot
from src.errors import run_cli, stage_parser
from src.lock import project_lock
from src.models import check_models_fit
from src.params import Params
from src.profile import load_run_params
from src.paths import CHECKPOINT_DIR, MODELS_DIR, SNAPSHOT_DIR, TRAIN_METRICS_FILE, TRAIN_PLOTS_DIR
from src.timing import Stopwatch
from src.tracking import TrainingRun, check_store
from src.training.checkpoint import checkpoint_meta, training_settings
from src.training.distributed import check_same_on_every_rank, end_distributed, init_distributed, process_device
from src.training.loop import TrainingInterrupted, check_snapshot, train_gan
from src.training.outputs import write_outputs

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    stage_parser("python -m src.train", __doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_run_params()
    with project_lock():  # rank 0 only (torchrun's RANK)
        train_stage(params)


def train_stage(params: Params) -> None:
    """The stage for checked params: train (resuming a matching checkpoint), write the outputs, track."""
    rank, world = init_distributed(params.train.device)
    tracker: TrainingRun | None = None
    watch = Stopwatch()
    try:
        device = process_device(params.train.device, world)
        with watch.section("data"):
            snapshot = load_snapshot(SNAPSHOT_DIR, verify=rank == 0)
            check_snapshot(snapshot, params.train.batch_size)
            check_collect_params(params, snapshot)
        if world > 1:  # nodes on other machines each read their own copy
            check_same_on_every_rank(snapshot.sha256, f"the snapshot in {SNAPSHOT_DIR}",
                                     "give every node the same one (`dvc pull` on each, docs/team.md)")
        check_models_fit(params)
        check_can_create(CHECKPOINT_DIR, MODELS_DIR, TRAIN_METRICS_FILE.parent, TRAIN_PLOTS_DIR, folders=True)
        fid_fn = None
        meta: dict[str, Any] = {}
        if rank == 0:
            check_store()  # before any work: a store that cannot be used costs nothing
            # Before anything starts: a refused checkpoint must leave the MLflow run it belongs to alone.
            settings = training_settings(params, snapshot.sha256, device, world)
            resume_id = checkpoint_meta(CHECKPOINT_DIR, settings, params.train.iterations).get("mlflow_run_id")
            if params.train.fid_every > 0:
                from src.fid import make_fid_fn

                with watch.section("fid reference"):
                    fid_fn = make_fid_fn(snapshot, params, device)
            tracker = TrainingRun(params, snapshot, device, world, resume_id)
            meta = {"mlflow_run_id": tracker.run_id}
        result = train_gan(
            params,
            snapshot,
            checkpoint_dir=CHECKPOINT_DIR,
            fid_fn=fid_fn,
            log_fn=tracker.log_metrics if tracker else None,
            image_fn=tracker.log_images if tracker else None,
            progress=rank == 0,
            checkpoint_meta=meta,
        )
        for name, seconds in result.seconds.items():
            watch.add(name, seconds)
        if rank == 0 and tracker is not None:
            with watch.section("writing"):
                written = write_outputs(result, params, snapshot, seconds=watch.rounded(),
                                        run_ids={"run_id": tracker.run_id, "experiment_id": tracker.experiment_id})
                tracker.finish(result, params, written)
            tracker.log_metrics(result.iterations, {f"time_{k.replace(' ', '_')}_s": v for k, v in watch.seconds.items()})
            tracker.end("FINISHED")
            tracker = None
            log.info("trained %d iterations in %.0f s of training (%.0f images/s, profile %s); outputs in %s/, %s, %s/",
                     result.iterations, result.elapsed_s, result.images_per_s, params.profile, MODELS_DIR,
                     TRAIN_METRICS_FILE, TRAIN_PLOTS_DIR)
            log.info(watch.summary())
    except TrainingInterrupted as exc:
        if tracker is not None:
            tracker.end("KILLED")
            tracker = None
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None
    finally:
        if tracker is not None:
            tracker.end("FAILED")
        if world > 1:
            end_distributed()


if __name__ == "__main__":
    run_cli(main)

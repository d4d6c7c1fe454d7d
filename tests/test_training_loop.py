"""`train_gan` (src/training/loop.py): devices and inputs, callbacks, FID and best step, time budget, failures, resume."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from src.data import DeviceSampler, SnapshotError, load_snapshot
from src.device import DeviceError, resolve_device
from src.training import NonFiniteLossError, train_gan, write_outputs
from tests.conftest import tiny


# Devices and inputs ------------------------------------------------------------------------


def test_cuda_requested_but_absent_is_a_clear_error(monkeypatch, snapshot):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="train.device = 'cuda'.*set train.device to auto or cpu"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(DeviceError):
        train_gan(tiny(device="cuda:0"), snapshot, checkpoint_dir=None, progress=False)


def test_snapshot_of_other_image_shape_is_refused(tmp_path, make_snapshot):
    small = load_snapshot(make_snapshot(tmp_path / "small", size=32))
    with pytest.raises(SnapshotError, match=r"shape \(3, 32, 32\).*\(3, 64, 64\).*dvc repro collect"):
        train_gan(tiny(), small, checkpoint_dir=None, progress=False)


# The loop ----------------------------------------------------------------------------------


def test_callbacks_history_and_best_fid(snapshot, tmp_path):
    logged, images, fid_steps = [], [], []
    fids = {5: 30.0, 10: 20.0, 15: 25.0, 20: 40.0}

    def fid_fn(step, gen):
        assert not gen.training
        fid_steps.append(step)
        return fids[step]

    result = train_gan(
        tiny(fid_every=5, image_every=10, ema_decay=0.9), snapshot, checkpoint_dir=tmp_path / "ckpt",
        fid_fn=fid_fn, log_fn=lambda s, m: logged.append((s, m)),
        image_fn=lambda s, r, f: images.append((s, r.shape, r.dtype, f.shape, f.dtype)), progress=False,
    )
    assert result.iterations == 20 and result.stopped_by == "iterations"
    assert fid_steps == [5, 10, 15, 20]
    assert (result.best_fid, result.best_step) == (20.0, 10)
    assert [row["step"] for row in result.loss_history] == [5, 10, 15, 20]
    loss_logs = [m for _, m in logged if "loss_g" in m]
    assert len(loss_logs) == 4
    assert all(set(m) == {"loss_g", "loss_d", "d_real", "d_fake", "images_per_s"} for m in loss_logs)
    assert 0 < loss_logs[-1]["d_real"] < 1 and loss_logs[-1]["images_per_s"] > 0
    assert images == [(s, (64, 3, 64, 64), torch.uint8, (64, 3, 64, 64), torch.uint8) for s in (10, 20)]
    assert result.eval_generator is result.ema_generator
    best = result.best_state  # the EMA weights of step 10, not the final ones
    assert best is not None and not torch.equal(best["pipe.0.weight"], result.ema_generator.pipe[0].weight)


def test_one_images_per_s_figure_and_the_bar_closes_before_the_last_fid(snapshot, tmp_path):
    import time

    from tqdm.std import tqdm

    open_bars, logged = {}, []

    def fid_fn(step, gen):
        open_bars[step] = len(tqdm._instances)
        time.sleep(0.3)  # FID time: must count in the breakdown, not in images/s
        return 1.0

    result = train_gan(tiny(fid_every=10), snapshot, checkpoint_dir=tmp_path / "ckpt", fid_fn=fid_fn,
                       log_fn=lambda s, m: logged.append(m), progress=True)
    assert open_bars == {10: 1, 20: 0}  # mid-run FID under the open bar; the last one after it closed
    assert set(result.seconds) >= {"training", "fid", "checkpoints"}
    assert result.seconds["fid"] >= 0.6 and result.seconds["training"] == pytest.approx(result.elapsed_s, abs=0.1)
    expected = result.iterations * 8 / result.elapsed_s  # batch 8, training seconds only
    assert result.images_per_s == pytest.approx(expected, rel=1e-6)
    last = [m["images_per_s"] for m in logged if "images_per_s" in m][-1]
    assert last == pytest.approx(result.images_per_s, rel=0.05)


def test_the_bar_counts_to_the_time_budget_not_to_an_iteration_count_it_never_reaches(snapshot, monkeypatch):
    from tqdm import auto

    bars = []

    class Recorder(auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    def state(bar):
        return bar.total, bar.n, dict(kv.split("=") for kv in bar.postfix.split(", "))

    monkeypatch.setattr(auto, "tqdm", Recorder)
    result = train_gan(tiny(iterations=1_000_000, time_budget_s=1.0, log_every=5), snapshot, checkpoint_dir=None,
                       progress=True)
    (total, n, postfix), = map(state, bars)
    assert result.stopped_by == "time_budget" and total == 1000 and n == 1000  # the whole budget, in per mille
    assert postfix["it"] == f"{result.iterations}/1000000" and postfix["s"] == "1/1"
    bars.clear()
    train_gan(tiny(iterations=12), snapshot, checkpoint_dir=None, progress=True)
    (total, n, postfix), = map(state, bars)
    assert (total, n) == (12, 12) and "it" not in postfix  # no budget: the bar counts iterations


def test_train_gan_refuses_params_not_yet_resolved(snapshot):
    with pytest.raises(ValueError, match="pass src.params.effective"):
        train_gan(tiny(recipe="article"), snapshot, checkpoint_dir=None, progress=False)


def test_fid_callback_exceptions_propagate(snapshot):
    class Pruned(Exception):
        pass

    def fid_fn(step, gen):
        raise Pruned

    with pytest.raises(Pruned):
        train_gan(tiny(fid_every=5), snapshot, checkpoint_dir=None, fid_fn=fid_fn, progress=False)


def test_time_budget_stops_early_with_full_outputs(snapshot, tmp_path):
    params = tiny(iterations=1_000_000, time_budget_s=1.0, fid_every=0, ema_decay=0.9)
    result = train_gan(params, snapshot, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert result.stopped_by == "time_budget"
    assert 0 < result.iterations < 1_000_000 and 1.0 <= result.elapsed_s < 5.0
    written = write_outputs(result, params, snapshot, root=tmp_path / "out")
    for name in ("models/generator.pt", "models/generator_ema.pt", "models/discriminator.pt", "models/run.json",
                 "metrics/train.json", "plots/train/losses.csv", "plots/train/samples.png"):
        assert (tmp_path / "out" / name).is_file(), name
    assert "generator_best.pt" not in written and not (tmp_path / "out/plots/train/fid.csv").exists()
    # The games recorded (src.sample reads them) are the snapshot's, not params.yaml's three.
    payload = torch.load(tmp_path / "out/models/generator.pt", weights_only=True)
    assert params.collect.games != snapshot.games and payload["params"]["collect.games"] == snapshot.games
    metrics = json.loads((tmp_path / "out/metrics/train.json").read_text())
    assert metrics["iterations"] == result.iterations and metrics["stopped_by_time_budget"] is True
    assert {"loss_g", "loss_d", "d_real", "d_fake", "images_per_s", "elapsed_s"} <= set(metrics)
    # The budget counts across resumes: a rerun finds it spent and trains no further.
    again = train_gan(params, snapshot, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert again.iterations == result.iterations and again.stopped_by == "time_budget"


def test_non_finite_loss_stops_with_iteration_and_last_good_checkpoint(snapshot, tmp_path, monkeypatch):
    calls = {"n": 0}
    clean = DeviceSampler.sample_labelled

    def poisoned(self, batch_size):
        calls["n"] += 1
        batch, labels = clean(self, batch_size)
        return (batch.fill_(float("nan")) if calls["n"] >= 16 else batch), labels

    monkeypatch.setattr(DeviceSampler, "sample_labelled", poisoned)
    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(NonFiniteLossError) as err:
        train_gan(tiny(log_every=4, checkpoint_every=10), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    message = str(err.value)
    assert "non-finite loss at iteration 16" in message
    assert f"{ckpt_dir / 'checkpoint.pt'} (iteration 10), is untouched" in message
    ckpt = torch.load(ckpt_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["model"]["generator"].values() if v.is_floating_point())


def test_mismatched_checkpoint_is_ignored_and_report_settings_still_resume(snapshot, tmp_path, caplog):
    ckpt_dir = tmp_path / "ckpt"
    train_gan(tiny(iterations=10), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    with caplog.at_level(logging.INFO, logger="src.training"):
        more = train_gan(tiny(iterations=15, log_every=3), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    assert "resuming from" in caplog.text and "iteration 10" in caplog.text
    assert more.iterations == 15 and more.loss_history[0]["step"] == 5  # history carried over
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="src.training"):
        other = train_gan(tiny(iterations=5, lr_d=1e-3), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    assert "ignoring checkpoint" in caplog.text and "other training params (train.lr_d 0.00142 -> 0.001)" in caplog.text
    assert other.iterations == 5

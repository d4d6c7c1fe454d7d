"""The metrics of one generated set against the holdout: FID, precision/recall, game shares, per-game FID.

`set_metrics` scores one set of generated screens (given as Inception features and images) the
same way for the shipped drawing and for the other palette drawing (`_raw` / `_palette`
suffixes). Precision and recall are Kynkäänniemi et al.'s k-NN estimate (torch-fidelity's code);
density and coverage are Naeem et al.'s (2020) from the same features, and `real_scale` gives all
four for training frames in place of generated ones, the values a perfect generator would reach.
Game shares come from src/coverage.py's classifier; a game with fewer than `min_game_samples`
generated screens gets no per-game FID (null) and a `SmallSampleWarning`. The evaluate stage
(src/evaluate.py) draws the screens and adds the floors and counts.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from src import fid

PRC_NEIGHBOURHOOD = 3  # k of the k-NN precision/recall (Kynkäänniemi et al. use 3)
DC_NEIGHBOURHOOD = 5  # k of density/coverage (Naeem et al. use 5)


class SmallSampleWarning(UserWarning):
    pass


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = PRC_NEIGHBOURHOOD) -> dict:
    """Kynkäänniemi et al. (2019) k-NN precision and recall (k = 3 by default), torch-fidelity's implementation."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=k,
                                 prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return {"precision": out["precision"], "recall": out["recall"]}


def density_coverage(fake: torch.Tensor, real: torch.Tensor, k: int = DC_NEIGHBOURHOOD) -> dict:
    """Naeem et al. (2020): each real sample's ball reaches its k-th nearest real neighbour.

    density: how many real balls hold each generated sample, over k, averaged (about 1 for real data,
    above 1 where generated samples crowd dense real regions); coverage: the share of real balls
    holding at least one generated sample. Unlike k-NN precision, neither trusts the fakes' own
    neighbourhoods, so outliers among them do not inflate it.
    """
    real, fake = real.double(), fake.double()
    radii = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # k + 1: each real is its own nearest
    inside = torch.cdist(fake, real) < radii  # (fakes, reals): fake i in real j's ball
    return {"density": inside.sum().item() / (k * len(fake)), "coverage": inside.any(dim=0).double().mean().item()}


def real_scale(train: torch.Tensor, real: torch.Tensor) -> dict:
    """Precision, recall, density and coverage of training frames against the holdout: the top of their scale."""
    scores = {**precision_recall(train, real), **density_coverage(train, real)}
    return {f"{k}_train_frames": v for k, v in scores.items()}


def set_metrics(fake: torch.Tensor, images: torch.Tensor, holdout: torch.Tensor, games: list[str],
                holdout_labels: np.ndarray, classifier, prc_index: np.ndarray | None, *,
                min_game_samples: int, device: torch.device, suffix: str = "") -> dict:
    """FID, precision/recall, game shares and per-game FID of one generated set (`fake`: its features)."""
    from src import coverage

    real_prc = holdout if prc_index is None else holdout[torch.from_numpy(prc_index)]
    metrics = {"fid": fid.fid_from_features(holdout, fake, device=device), **precision_recall(fake, real_prc),
               **density_coverage(fake, real_prc)}
    predicted = classifier.predict(images)
    generated_shares = coverage.shares(predicted, len(games))
    snapshot_shares = coverage.shares(holdout_labels, len(games))
    metrics["coverage_tv"] = coverage.total_variation(generated_shares, snapshot_shares)
    for g, game in enumerate(games):
        mine = torch.from_numpy(predicted == g)
        count = int(mine.sum())
        metrics[f"coverage_share/{game}"] = float(generated_shares[g])
        metrics[f"count_game/{game}"] = count
        if count < min_game_samples:
            warnings.warn(
                f"{game}: {count} of {len(images)} generated screens{suffix and ' (' + suffix[1:] + ')'} are assigned "
                f"to it, fewer than {min_game_samples}: its per-game FID is not scored (null); raise "
                "evaluate.num_samples to score it", SmallSampleWarning, stacklevel=3,
            )
            metrics[f"fid_game/{game}"] = None
        else:
            real = holdout[torch.from_numpy(np.asarray(holdout_labels) == g)]
            metrics[f"fid_game/{game}"] = fid.fid_from_features(real, fake[mine], device=device)
    return {f"{k}{suffix}" if "/" not in k else f"{k.split('/')[0]}{suffix}/{k.split('/', 1)[1]}": v
            for k, v in metrics.items()}

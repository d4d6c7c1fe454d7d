"""Which game a screen shows: a small classifier trained on the snapshot's labelled frames.

`evaluate` uses it to measure game coverage: the share of generated screens it assigns to each
game, compared with the snapshot's shares, and which generated screens go into each game's FID.
FID alone cannot say that one game is missing.

The model is multinomial logistic regression on frames average-pooled to 3x16x16 (768 inputs),
standardised, fitted full-batch with Adam from a fixed seed on at most 3,000 evenly
spaced training frames: no sampling, so the same snapshot gives the same classifier on a CPU. It
takes seconds on two cores (Atari games differ in their whole-screen colours and layout, which
16x16 keeps; on the 30,000-frame study snapshot it labels 100% of the holdout right). It is cached under `.cache/coverage/`
by the snapshot's digest and refused (CoverageError) unless it labels >= 99% of the holdout right:
a classifier that cannot tell real screens apart says nothing about generated ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from src.atomic import save_torch_atomic
from src.errors import UserError

if TYPE_CHECKING:
    from src.data import Snapshot

CLASSIFIER_VERSION = 1  # part of the cache key: bump when the model or its training changes
POOL = 4  # 64x64 -> 16x16
STEPS = 100
MAX_TRAIN_FRAMES = 3000  # evenly spaced training frames (the splits are shuffled, so all games are in)
LEARNING_RATE = 0.05
SEED = 0
MIN_ACCURACY = 0.99
CHUNK = 4096  # frames pooled at a time (a whole split in float would take gigabytes)


class CoverageError(UserError):
    pass


def pooled(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, 64, 64) -> float32 (N, 768): each 4x4 block's mean colour, 0..1."""
    out = []
    for start in range(0, len(images), CHUNK):
        batch = images[start : start + CHUNK]
        batch = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.array(batch))  # memmaps are read-only
        out.append(torch.nn.functional.avg_pool2d(batch.float() / 255, POOL).flatten(1))
    return torch.cat(out) if out else torch.empty(0, 3 * (64 // POOL) ** 2)


@dataclass
class GameClassifier:
    """Logistic regression on pooled frames: `predict(images)` -> game index per image."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (games, 768)
    bias: torch.Tensor
    games: list[str]
    holdout_accuracy: float = float("nan")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        if len(images) == 0:
            return np.empty(0, np.int64)
        return self.logits(pooled(images)).argmax(dim=1).numpy()

    def state(self) -> dict:
        return {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias,
                "games": self.games, "holdout_accuracy": self.holdout_accuracy}


def fit(images: np.ndarray, labels: np.ndarray, games: list[str]) -> GameClassifier:
    """Full-batch logistic regression on `images` (uint8 frames) and their game `labels`."""
    x = pooled(images)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-3)  # constant pixels: no division by ~0
    z = (x - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        weight = (torch.randn(len(games), x.shape[1], ) * 0.01).requires_grad_()
    bias = torch.zeros(len(games), requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=LEARNING_RATE)
    for _ in range(STEPS):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(z @ weight.T + bias, y).backward()
        optimiser.step()
    return GameClassifier(mean, std, weight.detach(), bias.detach(), list(games))


def accuracy(classifier: GameClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    return float((classifier.predict(images) == np.asarray(labels)).mean())


def default_cache_dir() -> Path:
    from src.paths import repo_root

    return repo_root() / ".cache" / "coverage"


def game_classifier(snapshot: Snapshot, cache_dir: Path | None = None) -> GameClassifier:
    """The snapshot's classifier (trained on its train split, scored on its holdout), cached by digest."""
    path = Path(cache_dir or default_cache_dir()) / f"{snapshot.sha256[:32]}-v{CLASSIFIER_VERSION}.pt"
    classifier = None
    if path.is_file():
        try:
            classifier = GameClassifier(**torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # a torn or foreign cache file is only a cache miss
            warnings.warn(f"ignoring unreadable coverage cache file {path} ({exc}); retraining", stacklevel=2)
    if classifier is None:
        every = max(1, len(snapshot.train_images) // MAX_TRAIN_FRAMES)
        classifier = fit(snapshot.train_images[::every], np.asarray(snapshot.train_labels)[::every], snapshot.games)
        classifier.holdout_accuracy = accuracy(classifier, snapshot.holdout_images, snapshot.holdout_labels)
        save_torch_atomic(path, classifier.state())
    if not classifier.holdout_accuracy >= MIN_ACCURACY:
        raise CoverageError(
            f"the game classifier labels only {classifier.holdout_accuracy:.1%} of the holdout frames right "
            f"(needs >= {MIN_ACCURACY:.0%}), so its game shares would mean nothing; the snapshot's games "
            f"({', '.join(snapshot.games)}) are too alike for it, or its labels are wrong: check "
            "collect.games and recollect with `dvc repro collect`"
        )
    return classifier


def shares(predicted: np.ndarray, n_games: int) -> np.ndarray:
    """Fraction of items per game index."""
    counts = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=n_games)
    return counts / max(counts.sum(), 1)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance between two distributions: 0 = same shares, 1 = disjoint."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())

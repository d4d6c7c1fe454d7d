"""Benchmark: wall-clock time of a whole `dvc repro` on the shipped params.yaml's `cpu` profile.

Copies the repository's tracked files (the working tree's versions) into a fresh directory, makes
it a git + DVC repo with its own empty FID cache, MLflow database and DVC cache, sets `profile: cpu`
in its params.yaml, and times, as a user meets them:
(a) `dvc repro` from nothing: collect -> train -> evaluate, Inception features of the real frames
    computed for the first time;
(b) `dvc repro` again with nothing changed (DVC only checks hashes);
(c) `dvc repro` after raising `profiles.cpu.train.iterations`: collect is skipped, training continues from its
    checkpoint, evaluate reuses the cached real features.
Each stage's own time comes from the outputs it writes. The Inception weights must already be in
the torch hub cache (`python -m src.inception_weights`); nothing is downloaded.

    python benchmarks/bench_repro.py [--keep DIR] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_md import RESULTS_MD as RESULTS, write_block  # noqa: E402
from src.params import set_params  # noqa: E402

# The shipped params.yaml on its laptop profile (README, Profiles), forced so a GPU box measures it too.
PRESET = {"profile": "cpu"}
ITERATIONS_KEY = "profiles.cpu.train.iterations"
MORE = 1.2  # (c) raises the profile's iterations by a fifth, whatever params.yaml ships


def copy_tracked(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"],
                   cwd=dest, check=True)


def repro(work: Path, label: str) -> dict[str, object]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        sys.exit(f"`dvc repro` ({label}) failed with exit status {out.returncode}:\n{out.stdout}\n{out.stderr}")
    ran = re.findall(r"Running stage '([^']+)'", out.stdout)
    return {"label": label, "seconds": seconds, "ran": ran}


def stage_seconds(work: Path) -> dict[str, float]:
    collect = json.loads((work / "metrics" / "collect.json").read_text())
    train = json.loads((work / "metrics" / "train.json").read_text())
    return {"collect (frames)": collect["collect_seconds"], "train (training loop)": train["elapsed_s"]}


def table(runs: list[dict[str, object]]) -> str:
    rows = ["| run | stages run | wall time |", "|---|---|---:|"]
    for r in runs:
        stages = ", ".join(r["ran"]) or "none (up to date)"
        rows.append(f"| {r['label']} | {stages} | {r['seconds']:.1f} s |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None, help="run in this (new) directory and keep it")
    parser.add_argument("--write", action="store_true", help=f"update the section in {RESULTS.relative_to(REPO)}")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="atari-gan-repro-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        sys.exit(f"--keep {work}: the directory must be new or empty")
    load_before = os.getloadavg()
    try:
        copy_tracked(work)
        set_params(work / "params.yaml", PRESET)
        runs = [repro(work, "(a) from nothing: collect, train, evaluate, empty FID cache")]
        inner = stage_seconds(work)
        runs.append(repro(work, "(b) again, nothing changed"))
        before = yaml.safe_load((work / "params.yaml").read_text())["profiles"]["cpu"]["train"]["iterations"]
        more = int(before * MORE)
        set_params(work / "params.yaml", {ITERATIONS_KEY: more})
        runs.append(repro(work, f"(c) {ITERATIONS_KEY} {before} -> {more}"))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    preset = " ".join(f"-S {k}={v}" for k, v in PRESET.items())
    text = "\n".join([
        f"{dt.date.today().isoformat()} · {os.cpu_count()} logical cores · load average (1/5 min) "
        f"{load_before[0]:.2f}/{load_before[1]:.2f} before, {os.getloadavg()[0]:.2f}/{os.getloadavg()[1]:.2f} after "
        f"· preset: `{preset}`",
        "",
        table(runs),
        "",
        "Inside (a): " + ", ".join(f"{k} {v:.1f} s" for k, v in inner.items()) + ".",
    ])
    print(text)
    if args.write:
        write_block("bench-repro", text, "## Whole pipeline: `dvc repro` on the cpu profile\n\n"
                    "Written by `benchmarks/bench_repro.py --write`.\n\n")

if __name__ == "__main__":
    main()

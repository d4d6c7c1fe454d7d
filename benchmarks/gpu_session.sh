#!/usr/bin/env bash
# The GPU half of issue 25's protocol (docs/gpu.md) in one device call: install the carried wheels, collect the
# default snapshot, measure the default's and the article's training speed side by side, then train each
# candidate for $BUDGET seconds of training, one run at a time on the whole GPU, no FID during training. Every
# result lands in $OUT as soon as it exists (one generator file per run, the log, the speed table), so a call cut
# short still brings back what it finished; a run that would pass $LIMIT seconds is skipped, not started.
#
#   benchmarks/gpu_session.sh wheels   # here, once (needs PyPI): the packages the device lacks, into .whl/
#   benchmarks/gpu_session.sh run      # there: the device tool's run with carry [".whl"], timeout_s 600
#   benchmarks/gpu_session.sh check    # here, on the CPU: the same steps, tiny, then score and table them
#
# RUNS lists candidate:seed[:budget seconds] in order of priority (candidates: benchmarks/gpu_study.py); ALSO_AT
# (seconds) also saves each longer run's generator when its training time reaches it, so one 180-s run gives the
# 90-s result too. 8 files come back from $OUT: the log, the speed table and 6 generators at most. Then, here:
# gpu_study.py score DIR (the CPU, standard weights) and table DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
# Round 1 (docs/gpu.md): the default for 3 minutes, its 90-s generator saved on the way, and the article for 90 s.
# It does not fit one 600-s call: what is skipped here runs in a second call on the still-warm machine.
RUNS=${RUNS:-"default:0:180 default:1:180 article:0:90 article:1:90"}
BUDGET=${BUDGET:-90}
ALSO_AT=${ALSO_AT-90}
BENCH_SECONDS=${BENCH_SECONDS:-10}
LIMIT=${LIMIT:-570}
SYNC_EVERY=${SYNC_EVERY:-100}  # steps between loss reads and ALSO_AT checks: ~0.2 s on an H200
WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 gymnasium==1.4.0
farama-notifications==0.0.6 ale-py==0.12.1 typing-extensions==4.16.0"  # pydantic needs typing-extensions >= 4.16
export PYTHONUNBUFFERED=1

case "${1:-}" in
wheels)  # the device's python3 is 3.12 (/work/.library/device/KINDS.md); pip matches each platform tag exactly
  # shellcheck disable=SC2086
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $WHEELS
  exit 0 ;;
run)
  : "${OUT:?run this on the device machine, where \$OUT is set}"
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in .whl/: run 'benchmarks/gpu_session.sh wheels' here and carry .whl" >&2; exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
  DEVICE=cuda SNAPSHOT=data/snapshot
  exec > >(tee "$OUT/session.log") 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  [ -f data/snapshot/manifest.json ] || python3 -m src.collect
  cp data/snapshot/manifest.json "$OUT/snapshot-manifest.json" ;;  # its digest, to match the snapshot scored on
check)
  OUT=$(mktemp -d) DEVICE=cpu BUDGET=${CHECK_BUDGET:-5} BENCH_SECONDS=3 RUNS="default:0:8 article:0 nosuch:0"
  ALSO_AT=4 SYNC_EVERY=4  # ~8 steps/s on 2 cores: a check every half second
  export OMP_NUM_THREADS=1  # 2 shared cores: a second thread only spins against other jobs
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # A small real snapshot (300 + 150 frames of the three games) from params.yaml's collect settings.
  mkdir -p "$OUT/project"
  python3 -c "import sys, yaml; raw = yaml.safe_load(open('params.yaml'))
raw['collect'].update(train_frames=300, holdout_frames=150, shard_frames=100, workers=1)
open(sys.argv[1], 'w').write(yaml.safe_dump(raw))" "$OUT/project/params.yaml"
  (cd "$OUT/project" && python3 -m src.collect)
  SNAPSHOT=$OUT/project/data/snapshot ;;
*)
  echo "usage: $0 wheels|run|check (docs/gpu.md)" >&2; exit 2 ;;
esac

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 benchmarks/bench_recipes.py --device "$DEVICE" --seconds "$BENCH_SECONDS" --repeats 5 \
  --write --results "$OUT/bench-$DEVICE.md"
for run in $RUNS; do
  IFS=: read -r name seed budget <<<"$run"
  budget=${budget:-$BUDGET}
  if (( SECONDS + ${budget%.*} + 30 > LIMIT )); then
    echo "skipped $run: ${SECONDS} s spent, a run of ${budget} s would pass ${LIMIT} s"; continue
  fi
  # A run that fails (a capture, say) is reported and the next one still runs: the call is too dear to lose.
  python3 benchmarks/gpu_study.py train "$name" --seed "$seed" --budget-s "$budget" \
    ${ALSO_AT:+--also-at "$ALSO_AT"} --sync-every "$SYNC_EVERY" --device "$DEVICE" --snapshot "$SNAPSHOT" --out "$OUT" \
    || echo "error: run $run failed (exit $?)"
done
echo "done in ${SECONDS} s: $(ls "$OUT")"
if [ "${1}" = check ]; then
  python3 benchmarks/gpu_study.py score "$OUT" --samples 64 --snapshot "$SNAPSHOT"
  python3 benchmarks/gpu_study.py table "$OUT"
fi

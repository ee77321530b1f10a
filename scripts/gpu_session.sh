#!/usr/bin/env bash
# Issue 31's measurements on a lent GPU machine. Device time is short (15 minutes in all, the machine's start
# included; 10 minutes a command), so `all` runs every stage in one call, in order of value, each cut at a
# deadline, and each result is written as soon as its stage ends: a cut run still brings back what it measured.
# Here, first: scripts/gpu_wheels.sh. Then one device `run` with carry [".whl"] and the command
#   DEADLINE=560 bash scripts/gpu_session.sh all
# STAGE: all | check (versions, nvidia-smi, the CUDA tests) | train256 (bench_train, vclr vs open_clip_train,
#        compiled, then a profile run of vclr) | embed (bench_embed, ViT-B-32) | train1024 | decode (bench_decode: PIL
#        workers vs nvJPEG) | levers (loader decoding at jpeg_draft 0.8, patch dropout 0.5)
# Every JSON line goes to $OUT/results.jsonl as {"stage", "command", "result"}; logs to $OUT/session.log; the
# profile's tables and trace beside them (the device tool brings back at most 8 files).
# SMOKE=1 runs each stage at toy sizes (a CPU check of this script; its figures mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?stage: all, check, train256, embed, train1024, decode or levers}
OUT=${OUT:-/tmp/vclr-gpu-out}
DEADLINE=${DEADLINE:-0}  # seconds from now for the whole script (0: none); later stages are skipped, one running is cut
START=$(date +%s)
mkdir -p "$OUT"
LOG="$OUT/session.log"
PY=${PY:-python3}
if [ "${SMOKE:-0}" != 1 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # the image lacks these
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD/scripts:$PWD
  # datasets 5 wants pyarrow >= 24: on an image with an older pyarrow, the older datasets in .whl/alt (if carried)
  if ! $PY -c 'import datasets, pyarrow; assert int(pyarrow.__version__.split(".")[0]) >= 24' 2>/dev/null \
      && ls .whl/alt/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/alt/*.whl
  fi
else
  export PYTHONPATH=$PWD/scripts:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CPUS=$(nproc)
if [ "${SMOKE:-0}" = 1 ]; then
  IMAGES=320; EMBED=200; DECODE=40; BATCH=16; BIG=32; WORKERS=2; STEPS="--steps 6 --warmup-steps 2"
  BIG_STEPS="--steps 4 --warmup-steps 2"; PROFILE_STEPS="--steps 8 --warmup-steps 2"; MODEL=${MODEL:-ViT-B-32}
else
  # 160 steps at batch 256 (20 warm-up), 40 at 1024 (20 warm-up, open_clip_train logging every 5)
  IMAGES=40960; EMBED=10000; DECODE=1000; BATCH=256; BIG=1024; WORKERS=12; STEPS=""; BIG_STEPS="--log-every 5"
  PROFILE_STEPS="--steps 12 --warmup-steps 4"; MODEL=${MODEL:-ViT-B-32}
fi
DATA=/tmp/vclr-bench-photos
# the device gets a copy of the working tree without .git: the caller passes the commit (VCLR_COMMIT=$(git rev-parse --short HEAD))
COMMIT=${VCLR_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
TRAIN=(scripts/bench_train.py --model "$MODEL" --num-images "$IMAGES" --compile --data-dir "$DATA")

left() { echo $(( START + DEADLINE - $(date +%s) )); }

record() {  # record STAGE SECONDS COMMAND...: run a benchmark for at most SECONDS (and the deadline); keep its JSON line
  local stage=$1 limit=$2 line
  shift 2
  if [ "$DEADLINE" -gt 0 ]; then
    [ "$(left)" -lt 40 ] && { echo "skipped $stage ($(left) s left): $*" >> "$LOG"; return; }
    [ "$(left)" -lt "$limit" ] && limit=$(left)
  fi
  echo "+ [$stage, $(( $(date +%s) - START )) s, limit $limit s] $*" >> "$LOG"
  line=$(timeout -k 10 "$limit" "$@" 2>>"$LOG" | tail -1)
  # a cut benchmark leaves its children (open_clip_train, loader workers) on the device: end them before the next
  pkill -f open_clip_train.main 2>/dev/null; pkill -f "scripts/bench_" 2>/dev/null
  echo "$line" >> "$LOG"
  $PY -c 'import json, sys; print(json.dumps({"stage": sys.argv[1], "command": sys.argv[2], "commit": sys.argv[4],
                                             "gpu": sys.argv[5], "result": json.loads(sys.argv[3])}))' \
    "$stage" "$*" "$line" "$COMMIT" "$GPU" >> "$OUT/results.jsonl" || echo "no JSON line from: $*" >> "$LOG"
}

make_data() {  # bench_train's photo folder, made once (in parallel) for every training stage
  $PY -c 'import sys; from pathlib import Path; from bench_train import make_photo_dataset
make_photo_dataset(Path(sys.argv[1]) / f"{sys.argv[2]}x500x375", int(sys.argv[2]), 500, 375)' "$DATA" "$IMAGES"
}

check() {
  { nvidia-smi; $PY -c 'import torch, torchvision, open_clip, accelerate, transformers, faiss, pyarrow
print(torch.__version__, torchvision.__version__, open_clip.__version__, accelerate.__version__,
      transformers.__version__, faiss.__version__, pyarrow.__version__, torch.cuda.get_device_name())'
  } > "$OUT/check.log" 2>&1
  timeout -k 10 "${1:-600}" $PY -m pytest -q -p no:cacheprovider tests/test_train_gpu.py tests/test_data_device_decode.py \
    tests/test_eval_metrics.py tests/test_train_resume.py tests/test_train_profiling.py 2>&1 | tail -40 >> "$OUT/check.log"
}

train256() {
  record train256 240 $PY "${TRAIN[@]}" --batch "$BATCH" --workers "$WORKERS" $STEPS
  record profile256 120 $PY "${TRAIN[@]}" --batch "$BATCH" --workers "$WORKERS" --no-reference --profile-steps 5 \
    --out-dir "$OUT/profile256" $PROFILE_STEPS
  # the profile's timeline is large: keep the tables and the gzipped trace, drop the rest of the run directory
  if [ -d "$OUT/profile256" ]; then
    find "$OUT/profile256" -path '*/profile/*' \( -name 'summary.*' -o -name '*.trace.json.gz' \) \
      -exec cp {} "$OUT/" \;
    rm -rf "$OUT/profile256"
  fi
}
embed() { record embed 120 $PY scripts/bench_embed.py --images "$EMBED" --model "$MODEL" --batch "$BATCH" --workers "$CPUS"; }
train1024() { record train1024 240 $PY "${TRAIN[@]}" --batch "$BIG" --workers "$WORKERS" $BIG_STEPS; }
decode() { record decode 120 $PY scripts/bench_decode.py --sizes 500x375,4032x3024 --count "$DECODE" --workers "$CPUS"; }
levers() {
  record jpeg_draft 150 $PY "${TRAIN[@]}" --batch "$BATCH" --workers "$CPUS" --no-reference --decode-on loader \
    --jpeg-draft 0.8 $STEPS
  record patch_dropout 150 $PY "${TRAIN[@]}" --batch "$BATCH" --workers "$WORKERS" --no-reference \
    --patch-dropout 0.5 $STEPS
}

case $STAGE in
  all)  # the data is made while the CUDA tests run (CPU work beside GPU work: neither is timed)
    make_data > "$OUT/data.log" 2>&1 &
    check 170
    wait
    cat "$OUT/data.log" >> "$LOG"; rm -f "$OUT/data.log"
    train256; embed; train1024; decode; levers ;;
  check) check ;;
  train256|embed|train1024|decode|levers) make_data >> "$LOG" 2>&1; $STAGE ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
echo "done at $(( $(date +%s) - START )) s" >> "$LOG"
ls -la "$OUT"
tail -3 "$OUT/check.log" 2>/dev/null
$PY -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); res = r["result"]
    print(r["stage"], {k: res.get(k) for k in ("vclr_samples_per_s", "open_clip_train_samples_per_s", "ratio",
          "vclr_mfu", "open_clip_images_per_s", "vclr_index_images_per_s") if k in res})' "$OUT/results.jsonl" 2>/dev/null

#!/usr/bin/env bash
# Issue 14's measurements on a lent GPU machine, one stage per device call (each call: 10 minutes at most).
# Here, first: scripts/gpu_wheels.sh. Then, per stage, a device `run` with carry [".whl"] and the command
#   bash scripts/gpu_session.sh STAGE
# STAGE: check (versions, nvidia-smi, the CUDA tests) | decode (bench_decode: PIL workers vs nvJPEG) |
#        train256 / train1024 (bench_train, vclr vs open_clip_train, compiled, with a profile run of vclr) |
#        levers (loader decoding at jpeg_draft 0.8, patch dropout 0.5) | embed (bench_embed, ViT-B-32)
# Every JSON line goes to $OUT/<stage>.jsonl with its command; logs to $OUT/<stage>.log.
# SMOKE=1 runs each stage at toy sizes (a CPU check of this script; its figures mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?stage: check, decode, train256, train1024, levers or embed}
OUT=${OUT:-/tmp/vclr-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ "${SMOKE:-0}" != 1 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # the image lacks these
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CPUS=$(nproc)
if [ "${SMOKE:-0}" = 1 ]; then
  IMAGES=320; BATCH=16; BIG=32; WORKERS=2; STEPS="--steps 6 --warmup-steps 2"; MODEL=${MODEL:-ViT-B-32}
else
  IMAGES=40000; BATCH=256; BIG=1024; WORKERS=12; STEPS=""; MODEL=${MODEL:-ViT-B-32}
fi
DATA=/tmp/vclr-bench-photos

record() {  # run a benchmark command; keep its JSON line (the last line of stdout) with the command
  local log="$OUT/$STAGE.log" line
  echo "+ $*" >> "$log"
  line=$("$@" 2>>"$log" | tail -1)
  echo "$line" >> "$log"
  $PY -c 'import json, sys; print(json.dumps({"command": sys.argv[1], "result": json.loads(sys.argv[2])}))' \
    "$*" "$line" >> "$OUT/$STAGE.jsonl" || echo "no JSON line from: $*" >> "$log"
}

case $STAGE in
  check)
    { nvidia-smi; $PY -c 'import torch, torchvision, open_clip, accelerate, transformers, datasets, faiss
print(torch.__version__, torchvision.__version__, open_clip.__version__, accelerate.__version__,
      transformers.__version__, datasets.__version__, faiss.__version__, torch.cuda.get_device_name())'
    } > "$OUT/check.log" 2>&1
    $PY -m pytest -q -p no:cacheprovider tests/test_train_gpu.py tests/test_data_device_decode.py tests/test_eval_metrics.py \
      tests/test_train_resume.py tests/test_model.py tests/test_train_profiling.py 2>&1 | tail -40 >> "$OUT/check.log" ;;
  decode)
    record $PY scripts/bench_decode.py --sizes 500x375,4032x3024 --count $((IMAGES / 10)) --workers "$CPUS" ;;
  train256)
    record $PY scripts/bench_train.py --model "$MODEL" --batch "$BATCH" --num-images "$IMAGES" --workers "$WORKERS" \
      --compile --data-dir "$DATA" $STEPS
    record $PY scripts/bench_train.py --model "$MODEL" --batch "$BATCH" --num-images "$IMAGES" --workers "$WORKERS" \
      --compile --data-dir "$DATA" --no-reference --profile-steps 5 --out-dir "$OUT/profile256" $STEPS ;;
  train1024)
    record $PY scripts/bench_train.py --model "$MODEL" --batch "$BIG" --num-images "$IMAGES" --workers "$WORKERS" \
      --compile --data-dir "$DATA" $STEPS ;;
  levers)
    record $PY scripts/bench_train.py --model "$MODEL" --batch "$BATCH" --num-images "$IMAGES" --workers "$CPUS" \
      --compile --data-dir "$DATA" --no-reference --decode-on loader --jpeg-draft 0.8 $STEPS
    record $PY scripts/bench_train.py --model "$MODEL" --batch "$BATCH" --num-images "$IMAGES" --workers "$WORKERS" \
      --compile --data-dir "$DATA" --no-reference --patch-dropout 0.5 $STEPS ;;
  embed)
    record $PY scripts/bench_embed.py --images $((IMAGES / 4)) --model "$MODEL" --batch "$BATCH" --workers "$CPUS" ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
# the profile's timeline is large: keep the tables and the gzipped trace, drop the rest of the run directory
if [ -d "$OUT/profile256" ]; then
  find "$OUT/profile256" -path '*/profile/*' \( -name 'summary.*' -o -name '*.trace.json.gz' \) \
    -exec cp {} "$OUT/" \;
  rm -rf "$OUT/profile256"
fi
ls -la "$OUT"

#!/usr/bin/env bash
# Wheels the lent GPU machine's image lacks (it has torch, torchvision, accelerate, transformers, timm, safetensors,
# pyarrow...; see /work/.library/device/KINDS.md), at the versions of this checkout's .venv, into .whl/ (git-ignored
# through .git/info/exclude). A device call then carries .whl and starts with scripts/gpu_session.sh, which installs them.
#   scripts/gpu_wheels.sh            # here, once per session, before the first device call
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
PY=${PY:-.venv/bin/python}
NAMES="open_clip_torch ftfy wcwidth faiss-cpu datasets dill multiprocess webdataset braceexpand"
PINS=$($PY -m pip freeze 2>/dev/null | grep -i -E "^($(echo $NAMES | sed 's/ /|/g' | sed 's/[-_]/[-_]/g'))==" )
mkdir -p .whl
for pin in $PINS; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pin"
done
ls -la .whl
du -sh .whl

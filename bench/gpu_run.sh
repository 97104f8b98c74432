#!/usr/bin/env bash
# The one GPU benchmark run (issue 4): speed of PEFT LoRA r=4 / r=64, PEFT VB-LoRA and ours on the three H200 rows
# plus the SmolLM2-135M shape, then ours-vs-PEFT parity (and torch.compile) on the device. Installs nothing and
# needs no network. Everything goes to $OUT; a short markdown table is printed last. Total runtime <= ~5 minutes.
#
#   OUT=/some/dir bash bench/gpu_run.sh            # on the GPU machine, from the repository root
#   OUT=/tmp/o bash bench/gpu_run.sh --tiny        # CPU smoke test at tiny sizes (falls back to CPU without CUDA)
set -u
: "${OUT:?set OUT to the output directory}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-$(command -v python || command -v python3)}
TINY=""
[ "${1:-}" = "--tiny" ] && TINY="--tiny"
START=$(date +%s)
BUDGET=${BUDGET_S:-290}            # global guard: every step gets at most what is left of this
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

DEVICE=cuda
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DEVICE=cpu
  echo "no CUDA device: CPU fallback" | tee "$OUT/NO_CUDA"
fi
{
  date -u; hostname; $PY -V
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__)"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  git rev-parse HEAD 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. speed: most important row first; the JSON is rewritten after every case, so a timeout keeps finished cases.
STEPS=${STEPS:-20}
timeout -k 5 $(( $(left) - 95 )) $PY -u bench/speed.py --device "$DEVICE" $TINY \
  --cases llama1b_all,roberta_all,roberta_qv,smollm2_all --steps "$STEPS" --warmup 3 --fwd-steps 10 \
  --time-budget $(( $(left) - 140 )) --out "$OUT/speed.json" > "$OUT/speed.log" 2>&1
echo "speed.py exit $? after $(( $(date +%s) - START ))s" | tee -a "$OUT/speed.log"
grep -v -i "warn" "$OUT/speed.log" | tail -n 8

# 2. parity of ours vs PEFT VB-LoRA on the device (fp32 exact, bf16 / autocast vs the fp32 reference, caches, merge)
timeout -k 5 $(( $(left) > 90 ? 80 : $(left) - 10 )) $PY -u bench/parity.py --device "$DEVICE" \
  --out "$OUT/parity.json" > "$OUT/parity.log" 2>&1
echo "parity.py exit $? after $(( $(date +%s) - START ))s" | tee -a "$OUT/parity.log"
grep -E "^(PASS|FAIL)" "$OUT/parity.log"

# 3. torch.compile(fullgraph=True) parity, only with time to spare (compiling takes tens of seconds)
if [ -z "$TINY" ] && [ "$(left)" -gt 45 ]; then
  timeout -k 5 $(( $(left) - 15 )) $PY -u -c "
import json, sys; sys.argv = ['parity']
sys.path.insert(0, 'bench')
import parity
r = parity.check_compile('$DEVICE'); print('PASS' if r['ok'] else 'FAIL', 'compile', r)
json.dump({'device': '$DEVICE', 'checks': {'compile': r}}, open('$OUT/compile.json', 'w'), indent=1, default=str)
" > "$OUT/compile.log" 2>&1
  echo "compile check exit $?" >> "$OUT/compile.log"
  grep -E "^(PASS|FAIL)|exit" "$OUT/compile.log"
fi

# 4. the tables: full version to a file, short summary printed last
COMPILE_JSON=""
[ -f "$OUT/compile.json" ] && COMPILE_JSON="--parity $OUT/compile.json"
$PY bench/render_table.py "$OUT/speed.json" --parity "$OUT/parity.json" $COMPILE_JSON > "$OUT/table.md" 2>&1
echo
echo "total $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
echo
$PY bench/render_table.py "$OUT/speed.json" --summary-only

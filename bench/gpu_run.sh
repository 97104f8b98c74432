#!/usr/bin/env bash
# The one GPU benchmark call: every GPU row of docs/benchmarks.md and docs/results.md, offline, in one call of
# BUDGET_S seconds (default 540, under the 600 s a device command may run). Stages, most important first; each gets
# at most its cap and what is left of the budget, and a stage that fails or runs out leaves the others going:
#
#   qlora    QLoRA rows (issue 13): TinyLlama-1.1B shape (random weights from a LlamaConfig, no hub), all linear
#            modules, bf16 compute, 4-bit NF4 base with double quantization: peak CUDA memory and step time of VB-LoRA
#            (h=2048, b=256, r=4) vs PEFT LoRA r=4 and r=64, each in its own process (bench/qlora_bench.py)
#   compare  the VADER accuracy table with today's defaults (bench/gpu_compare.sh: vblora, lora, vera, tied-lora,
#            full; COMPARE_EPOCHS x COMPARE_SEEDS, default 4 x 3; 5 seeds need a second call on the same machine)
#   parity   ours vs PEFT VB-LoRA on the device (bench/parity.py), beside the compare stage (no timing in it)
#   speed    issue 4's rows: PEFT LoRA r=4 / r=64, PEFT VB-LoRA and ours, bf16 / fp32 (bench/speed.py)
#   fsdp     the FSDP check (issue 13 item 4; bench/fsdp_check.py): VB-LoRA sharded with FSDP2 over 2 processes vs
#            one process, loss / bank and logits gradients / parameters after 3 steps; its JSON goes into gpu_run.log
#   qlora7b  the QLoRA rows on a Llama-2-7B-shaped 4-layer cut, when time is left
#   compile  torch.compile(fullgraph=True) parity, when time is left
#
# The GPU machine has no bitsandbytes, MiniLM or VADER data: `bash bench/prepare_carry.sh` here builds .carry/
# (bitsandbytes 0.50.2 with its CUDA 13.0 library, MiniLM-L6 in fp16, the VADER split; ~52 MiB with the tree), and
# the device call carries it:
#
#   run(command="OUT=$OUT bash bench/gpu_run.sh", carry=[".carry"], timeout_s=600)
#   OUT=/tmp/o bash bench/gpu_run.sh --dry-run   # CPU: every stage at tiny sizes (no CUDA needed), a few minutes
#   STAGES=qlora,qlora7b OUT=/tmp/o bash bench/gpu_run.sh   # a subset
#
# Everything goes to $OUT (at most 8 files come back from a device call: qlora.json, speed.json, parity.json,
# compile.json, compare.json, compare_runs.json, gpu_run.log, tables.md); the tables are printed last.
set -u
: "${OUT:?set OUT to the output directory}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=""
case "${1:-}" in --dry-run|--tiny) DRY=1 ;; "") ;; *) echo "usage: OUT=dir bash bench/gpu_run.sh [--dry-run]" >&2; exit 2 ;; esac
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-$(command -v python || command -v python3)}
if ! command -v python >/dev/null; then  # bench/gpu_compare.sh tabulates with `python`
  mkdir -p /tmp/pyshim && ln -sf "$(command -v "$PY")" /tmp/pyshim/python && export PATH=/tmp/pyshim:$PATH
fi
export PYTHON=$PY
STAGES=${STAGES:-qlora,compare,speed,parity,fsdp,qlora7b,compile}
START=$(date +%s)
BUDGET=${BUDGET_S:-540}
LOG=$OUT/gpu_run.log
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
cap() { local l; l=$(left); echo $(( $1 < l - 5 ? $1 : l - 5 )); }   # a stage's limit: its cap or what is left
want() { [[ ",$STAGES," == *",$1,"* ]]; }
say() { echo "$*" | tee -a "$LOG"; }

# bitsandbytes from .carry (the machine has none): the unpacked wheel on PYTHONPATH, and the CUDA 13 runtime and
# cuBLAS of torch's own nvidia packages on the loader path for its CUDA library
if [ -d .carry/site/bitsandbytes ]; then
  export PYTHONPATH=$PYTHONPATH:$ROOT/.carry/site
  NV=$($PY - <<'PY' 2>/dev/null
import glob, os, site
dirs = {os.path.dirname(p) for s in site.getsitepackages() for n in ("libcudart.so.13", "libcublas.so.13")
        for p in glob.glob(os.path.join(s, "nvidia", "**", n), recursive=True)}
print(":".join(sorted(dirs)))
PY
)
  [ -n "$NV" ] && export LD_LIBRARY_PATH=$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

DEVICE=cuda
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DEVICE=cpu
  say "no CUDA device: CPU fallback"
fi
[ -n "$DRY" ] && DEVICE=cpu
{
  date -u; hostname; $PY -V
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__)"
  $PY -c "import bitsandbytes, importlib.metadata as m; print('bitsandbytes', m.version('bitsandbytes'),
bitsandbytes.__file__)" || echo "bitsandbytes: not importable (run bench/prepare_carry.sh and carry .carry)"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  git rev-parse HEAD 2>/dev/null
  echo "stages: $STAGES; budget ${BUDGET}s; dry run: ${DRY:-no}"
} 2>&1 | tee -a "$LOG"

# QLoRA: one process per method; --time-budget keeps the table of whatever finished
qlora() {  # $1 model shape, $2 json key, $3 cap (s)
  local lim; lim=$(cap "$3")
  [ "$lim" -lt 40 ] && { say "qlora $1: skipped, ${lim}s left"; return; }
  if [ -n "$DRY" ]; then
    timeout -k 5 "$lim" $PY -u bench/qlora_bench.py speed --dry-run --key "dry-run-tiny-$1" \
      --configs lora_r4-nf4,lora_r64-nf4,vblora-nf4 --out "$OUT/qlora.json" >> "$LOG" 2>&1
  else
    timeout -k 5 "$lim" $PY -u bench/qlora_bench.py speed --device cuda --model "$1" --batch "${QLORA_BATCH:-4}" \
      --seq "${QLORA_SEQ:-1024}" --steps "${QLORA_STEPS:-8}" --warmup 2 --rounds "${QLORA_ROUNDS:-1}" \
      --compute-dtype bfloat16 --configs "${QLORA_CONFIGS:-vblora-nf4,lora_r4-nf4,lora_r64-nf4}" --key "$2" \
      --time-budget $(( lim - 10 )) --model-tmp /tmp --out "$OUT/qlora.json" >> "$LOG" 2>&1
  fi
  say "qlora $1 exit $? after $(( $(date +%s) - START ))s"
}

want qlora && qlora llama1b "${DEVICE}-llama1b-nf4" 170

# parity checks correctness, not time: it runs on the GPU beside the compare stage (which is CPU-bound)
if want parity; then
  lim=$(cap 80)
  if [ "$lim" -lt 30 ]; then say "parity: skipped, ${lim}s left"; else
    timeout -k 5 "$lim" $PY -u bench/parity.py --device "$DEVICE" --out "$OUT/parity.json" > "$OUT/parity.log" 2>&1 &
    PARITY_PID=$!
  fi
fi

if want compare; then
  lim=$(cap 230)
  if [ "$lim" -lt 60 ]; then say "compare: skipped, ${lim}s left"
  elif [ ! -d .carry/minilm ] || [ ! -d .carry/cache/vader-movie ]; then
    say "compare: skipped, no .carry/minilm or .carry/cache (run bench/prepare_carry.sh and carry .carry)"
  else
    if [ -n "$DRY" ]; then  # a tiny compare on the CPU: 1 epoch on 64 sentences, one seed
      rm -rf /tmp/vblora-compare-dry  # gpu_compare.sh reuses finished runs it finds there
      ( MODEL=.carry/minilm VBLORA_CACHE=.carry/cache OUT=$OUT DEVICE=cpu JOBS=2 LIMIT_S=$(( lim - 20 )) \
        RUNS_DIR=/tmp/vblora-compare-dry METHODS=vblora,lora TRAIN_FLAGS="--max-train-samples 64 \
--max-eval-samples 32 --max-test-samples 32" bash bench/gpu_compare.sh 1 1 ) >> "$LOG" 2>&1
    else
      ( MODEL=.carry/minilm VBLORA_CACHE=.carry/cache OUT=$OUT DEVICE=cuda JOBS=${COMPARE_JOBS:-15} \
        LIMIT_S=$(( lim - 20 )) bash bench/gpu_compare.sh "${COMPARE_EPOCHS:-4}" "${COMPARE_SEEDS:-3}" ) >> "$LOG" 2>&1
    fi
    say "compare exit $? after $(( $(date +%s) - START ))s"
  fi
fi

# parity must be done before anything is timed
if [ -n "${PARITY_PID:-}" ]; then
  wait "$PARITY_PID"
  say "parity.py exit $? after $(( $(date +%s) - START ))s"
  cat "$OUT/parity.log" >> "$LOG" && rm -f "$OUT/parity.log"
  grep -E "^(PASS|FAIL)" "$LOG" | tail -n 8
fi

if want speed; then
  lim=$(cap 110)
  if [ "$lim" -lt 40 ]; then say "speed: skipped, ${lim}s left"; else
    # the JSON is rewritten after every case, so a timeout keeps the finished cases
    timeout -k 5 "$lim" $PY -u bench/speed.py --device "$DEVICE" ${DRY:+--tiny} \
      --cases "${SPEED_CASES:-llama1b_all,roberta_all,roberta_qv}" --steps "${STEPS:-20}" --warmup 3 --fwd-steps 10 \
      --time-budget $(( lim - 30 )) --out "$OUT/speed.json" >> "$LOG" 2>&1
    say "speed.py exit $? after $(( $(date +%s) - START ))s"
  fi
fi

if want fsdp; then  # its result goes into gpu_run.log: at most 8 files come back from a device call
  lim=$(cap 100)
  if [ "$lim" -lt 30 ]; then say "fsdp: skipped, ${lim}s left"; else
    timeout -k 5 "$lim" $PY -u bench/fsdp_check.py ${DRY:+--tiny} --timeout $(( lim / 2 - 5 )) \
      --out /tmp/fsdp_check.json >> "$LOG" 2>&1
    say "fsdp_check.py exit $? after $(( $(date +%s) - START ))s"
    [ -f /tmp/fsdp_check.json ] && { echo "fsdp_check.json:"; cat /tmp/fsdp_check.json; } >> "$LOG"
  fi
fi

if want qlora7b; then
  if [ -n "$DRY" ]; then say "qlora7b: the dry run's qlora stage covers its code path"
  else qlora llama7b_cut4 "${DEVICE}-llama7b-cut4-nf4" 150; fi
fi

if want compile && [ -z "$DRY" ]; then
  lim=$(cap 60)
  if [ "$lim" -lt 45 ]; then say "compile: skipped, ${lim}s left"; else
    timeout -k 5 "$lim" $PY -u -c "
import json, sys; sys.argv = ['parity']
sys.path.insert(0, 'bench')
import parity
r = parity.check_compile('$DEVICE'); print('PASS' if r['ok'] else 'FAIL', 'compile', r)
json.dump({'device': '$DEVICE', 'checks': {'compile': r}}, open('$OUT/compile.json', 'w'), indent=1, default=str)
" >> "$LOG" 2>&1
    say "compile check exit $? after $(( $(date +%s) - START ))s"
  fi
fi

# the tables: to tables.md, then printed
{
  [ -f "$OUT/qlora.json" ] && $PY bench/qlora_bench.py table "$OUT/qlora.json"
  [ -f "$OUT/compare.md" ] && { echo; echo "VADER compare:"; cat "$OUT/compare.md"; }
  if [ -f "$OUT/speed.json" ]; then
    COMPILE_JSON=""
    [ -f "$OUT/compile.json" ] && COMPILE_JSON="--parity $OUT/compile.json"
    PARITY_JSON=""
    [ -f "$OUT/parity.json" ] && PARITY_JSON="--parity $OUT/parity.json"
    echo; $PY bench/render_table.py "$OUT/speed.json" $PARITY_JSON $COMPILE_JSON
  fi
} > "$OUT/tables.md" 2>&1
rm -f "$OUT/compare.md"  # at most 8 files come back from a device call; tables.md holds it
echo
say "total $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/tables.md"

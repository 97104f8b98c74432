#!/usr/bin/env bash
# `vblora compare` on the default task (MiniLM-L6 + VADER movie snippets) on one GPU: every method x seed as a
# separate `vblora train` process, JOBS at a time (the model is small, so one process leaves the GPU mostly idle),
# then `vblora compare` tabulates the finished runs (it reuses every results.json it finds).
#   MODEL=.gpu/minilm VBLORA_CACHE=.gpu/cache OUT=/tmp/o bash bench/gpu_compare.sh [EPOCHS] [SEEDS] [extra train flags]
set -u
: "${OUT:?set OUT}" "${MODEL:?set MODEL to a local MiniLM directory}"
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
EPOCHS=${1:-4}; SEEDS=${2:-5}
FLAGS=${TRAIN_FLAGS:-}   # extra `vblora train` flags for every run, e.g. "--max-train-samples 200"
JOBS=${JOBS:-8}; DEVICE=${DEVICE:-cuda}; LIMIT=${LIMIT_S:-240}
RUNS=${RUNS_DIR:-/tmp/vblora-compare}
METHODS=${METHODS:-vblora,lora,vera,tied-lora,full}
mkdir -p "$RUNS" "$OUT"
start=$(date +%s)
for s in $(seq 0 $((SEEDS - 1))); do for m in ${METHODS//,/ }; do
  [ -f "$RUNS/$m-seed$s/results.json" ] && continue  # finished in an earlier call on this machine
  echo "$PY -m vblora train --model $MODEL --device $DEVICE --epochs $EPOCHS --method $m --seed $s \
--output $RUNS/$m-seed$s --overwrite $FLAGS > $RUNS/$m-seed$s.log 2>&1; \
echo $m seed $s exit \$? at \$(( \$(date +%s) - $start ))s"
done; done > "$RUNS/commands.txt"
timeout -k 5 "$LIMIT" xargs -P "$JOBS" -d '\n' -I{} bash -c {} < "$RUNS/commands.txt"
echo "training done after $(( $(date +%s) - start ))s"
# Tabulate only what finished: compare reuses each results.json; unfinished runs are listed as missing.
for s in $(seq 0 $((SEEDS - 1))); do for m in ${METHODS//,/ }; do
  [ -f "$RUNS/$m-seed$s/results.json" ] || echo "missing: $m seed $s ($(tail -n 2 "$RUNS/$m-seed$s.log" 2>/dev/null | tr '\n' ' '))"
done; done
python - "$RUNS" "$OUT" "$METHODS" "$SEEDS" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "src")
from vblora.experiments.compare import format_table, summarize
runs_dir, out, methods, seeds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4])
runs = {m: [json.loads((runs_dir / f"{m}-seed{s}" / "results.json").read_text())
            for s in range(seeds) if (runs_dir / f"{m}-seed{s}" / "results.json").exists()] for m in methods}
summary = summarize(runs, list(range(seeds)))
(out / "compare.json").write_text(json.dumps(summary, indent=2))
table = format_table(summary)
(out / "compare.md").write_text(table + "\n")
slim = {f"{m}-seed{r['seed']}": {k: r.get(k) for k in ("metrics", "best_epoch", "stored_parameters",
        "adapter_bytes", "train_time_s", "wall_time_s", "trainable_parameters", "config", "versions")}
        for m, rs in runs.items() for r in rs}
(out / "compare_runs.json").write_text(json.dumps(slim, indent=1, default=str))
print(table)
PY

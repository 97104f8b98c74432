"""How long writing one 4.9 MB file takes on this machine, outside any server: the size of the plugin's LoRA file
for a SmolLM2 all-linear rank-4 adapter (docs/serving.md, "Cold start, measured alone").

Each repetition fills a new buffer (as `LoRAFileLayout.files` does), writes it to a new file in DIR and records the
wall and thread-CPU milliseconds of the write alone; the files are kept until the end, as cache entries are.

Usage: python bench/file_write_probe.py [--dir /tmp] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

SIZE = 4_947_292  # bytes of adapter_model.safetensors + adapter_config.json in the bench's plain LoRA directories


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    walls, cpus = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for i in range(args.reps):
            buf = bytearray(SIZE // 4 * 4)
            torch.frombuffer(buf, dtype=torch.float32).copy_(torch.randn(SIZE // 4))
            wall, cpu = time.perf_counter(), time.thread_time()
            (Path(tmp) / f"{i}.bin").write_bytes(buf)
            walls.append(1000 * (time.perf_counter() - wall))
            cpus.append(1000 * (time.thread_time() - cpu))
    print(
        f"{args.dir}: write of {SIZE:,} bytes, ms: median wall {statistics.median(walls):.2f}, "
        f"cpu {statistics.median(cpus):.2f}; each (wall): {' '.join(f'{w:.1f}' for w in walls)}"
    )


if __name__ == "__main__":
    main()

#!/bin/bash
# The README's CPU table: ours vs timm (and our plain forward), float32 inference, batch 16 and 32, 224 px,
# three repeats, then one training step comparison. Appends to benchmarks/results/benchmark-<cpu>-torch<ver>.csv.
# Run from the repo root with the venv active, under the shared CPU lock:
#     flock /tmp/mambaout-cpu.lock benchmarks/cpu_check.sh        (~6 minutes on 2 EPYC cores)
set -u
CSV_DIR=benchmarks/results
mkdir -p "$CSV_DIR"
CSV="$CSV_DIR/$(python -c 'import torch; from mambaout.cli.benchmark import default_csv; print(default_csv(torch.device("cpu")))')"
echo "start $(date -u)"
for rep in 1 2 3; do
  for bs in 16 32; do
    echo "== repeat $rep, batch $bs, $(date -u +%T)"
    mambaout benchmark --device cpu --models mambaout_femto mambaout_tiny --batch-size "$bs" --warmup 2 --iters 5 \
      --with-reference --csv "$CSV" || echo "FAILED: repeat $rep batch $bs"
  done
done
echo "== training step, femto, batch 16, $(date -u +%T)"
mambaout benchmark --device cpu --models mambaout_femto --mode train --batch-size 16 --warmup 1 --iters 3 --csv "$CSV" \
  || echo "FAILED: training step"
echo "end $(date -u)"

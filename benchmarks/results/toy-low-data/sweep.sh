#!/usr/bin/env bash
# Hyperparameter sweep of auxilearn and auxinash on the low-data toy, read on `val` only.
# Seeds 100-102 (the reported runs use seeds 0-2); each N in its own results file.
# Usage: OMP_NUM_THREADS=1 bash benchmarks/results/toy-low-data/sweep.sh [OUT]
set -uo pipefail
# a setting whose training diverges (non-finite loss) is logged in $OUT/failed.txt and counts as not chosen
OUT=${1:-benchmarks/results/toy-low-data/sweep}
mkdir -p "$OUT"
for N in 50 200; do
  for SRC in aux train; do
    for EVERY in 1 5; do
      for LR in 0.001 0.01 0.1 1.0; do
        auxilia run toy --option main_labels=$N --method auxilearn --first-seed 100 --seeds 3 --no-plots \
          --hp meta_source="\"$SRC\"" --hp meta_every=$EVERY --hp meta_lr=$LR --out "$OUT/main_labels$N" >/dev/null 2>"$OUT/err" \
          || echo "N=$N auxilearn meta_source=$SRC meta_every=$EVERY meta_lr=$LR: $(tail -1 "$OUT/err")" >>"$OUT/failed.txt"
      done
    done
    for EVERY in 1 5 25; do
      for LR in 0.005 0.05 0.5 1.0; do
        auxilia run toy --option main_labels=$N --method auxinash --first-seed 100 --seeds 3 --no-plots \
          --hp meta_source="\"$SRC\"" --hp hypergrad_every=$EVERY --hp meta_lr=$LR --out "$OUT/main_labels$N" >/dev/null 2>"$OUT/err" \
          || echo "N=$N auxinash meta_source=$SRC hypergrad_every=$EVERY meta_lr=$LR: $(tail -1 "$OUT/err")" >>"$OUT/failed.txt"
      done
    done
  done
done
# Stage 2, added after reading stage 1's val column: auxilearn's best meta_lr was the smallest tried
# (larger ones diverge), so a smaller and an intermediate value.
for N in 50 200; do
  for SRC in aux train; do
    for EVERY in 1 5; do
      for LR in 0.0003 0.003; do
        auxilia run toy --option main_labels=$N --method auxilearn --first-seed 100 --seeds 3 --no-plots \
          --hp meta_source="\"$SRC\"" --hp meta_every=$EVERY --hp meta_lr=$LR --out "$OUT/main_labels$N" >/dev/null 2>"$OUT/err" \
          || echo "N=$N auxilearn meta_source=$SRC meta_every=$EVERY meta_lr=$LR: $(tail -1 "$OUT/err")" >>"$OUT/failed.txt"
      done
    done
  done
done
rm -f "$OUT/err"

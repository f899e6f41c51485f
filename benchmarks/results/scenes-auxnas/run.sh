#!/bin/bash
# Reduced CPU protocol of the scenes Aux-NAS comparison (see README.md). Usage: run.sh baselines|auxnas|auxnas-official|longer|token
set -e
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1
[ -f .venv/bin/activate ] && . .venv/bin/activate
OUT=benchmarks/results/scenes-auxnas
[ "$1" = token ] && OUT=$OUT/token  # labels do not name the backbone: a separate table
[ "$1" = longer ] && OUT=$OUT/longer  # twice the epochs: a separate table
C=(--seeds 3 --epochs 10 --no-plots --out "$OUT"
   --option size=32 --option train_size=256 --option 'auxiliaries=["normals"]' --option 'widths=[8,16,32]')
# α: Adam lr 0.3 and the official schedule's shape compressed to 0 until 10%, 1000 at 40% (see README.md)
A=(--option 'arch_options={"arch_lr":0.3,"penalty":{"peak":1000,"start":0.1,"end":0.4}}')
case "$1" in
  baselines)
    auxilia run scenes --arch shared --method stl "${C[@]}"
    auxilia run scenes --arch shared --method equal "${C[@]}"
    auxilia run scenes --arch aux-g-stage --method equal "${C[@]}"
    auxilia run scenes --arch aux-g-layer --method equal "${C[@]}" ;;
  auxnas)
    auxilia run scenes --arch aux-nas --method equal "${C[@]}" "${A[@]}"
    auxilia run scenes --arch aux-nas --method gcs "${C[@]}" "${A[@]}"
    auxilia run scenes --arch aux-nas --method pcgrad-aux "${C[@]}" "${A[@]}" ;;
  auxnas-official)  # the official schedule (0 until 50%, 1000 at 80%): recorded in official-schedule/
    auxilia run scenes --arch aux-nas --method equal "${C[@]/#$OUT/$OUT/official-schedule}" --option 'arch_options={"arch_lr":0.3}'
    auxilia run scenes --arch aux-nas --method gcs "${C[@]/#$OUT/$OUT/official-schedule}" --option 'arch_options={"arch_lr":0.3}' ;;
  longer)
    C+=(--epochs 20)
    auxilia run scenes --arch shared --method stl "${C[@]}"
    auxilia run scenes --arch aux-g-layer --method equal "${C[@]}"
    auxilia run scenes --arch aux-nas --method equal "${C[@]}" "${A[@]}"
    auxilia run scenes --arch shared --method equal "${C[@]}"
    auxilia run scenes --arch aux-g-stage --method equal "${C[@]}"
    auxilia run scenes --arch aux-nas --method gcs "${C[@]}" "${A[@]}"
    auxilia run scenes --arch aux-nas --method pcgrad-aux "${C[@]}" "${A[@]}" ;;
  token)
    T=(--option backbone='"token"' --option 'widths=[32,32]')
    auxilia run scenes --arch shared --method stl "${C[@]}" "${T[@]}"
    auxilia run scenes --arch aux-nas --method equal "${C[@]}" "${T[@]}" "${A[@]}" ;;
  *) echo "usage: $0 baselines|auxnas|auxnas-official|longer|token" >&2; exit 2 ;;
esac

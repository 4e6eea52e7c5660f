#!/usr/bin/env bash
# README command one: the main job, end to end, on the embedded digits teacher.
#   1. set up .venv (torch pinned to 2.13.0) and install arcflow;
#   2. record teacher trajectories (50 Euler steps x 2 for CFG) on a local Ray cluster;
#   3. distill the ArcFlow student and the K=1 linear baseline with the same data and budget;
#   4. evaluate both against the teacher, print the table, and say where the grid is.
# Every stage is resumable: rerunning the script continues where it stopped (and re-evaluates).
# Sizes can be overridden: ARCFLOW_DEMO_DIR, ARCFLOW_DEMO_SAMPLES, ARCFLOW_DEMO_ITERS, ARCFLOW_DEMO_EVAL.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
A=.venv/bin/arcflow
DIR=${ARCFLOW_DEMO_DIR:-demo}
SAMPLES=${ARCFLOW_DEMO_SAMPLES:-10000}
ITERS=${ARCFLOW_DEMO_ITERS:-1500}
EVAL=${ARCFLOW_DEMO_EVAL:-1000}
mkdir -p "$DIR"

echo "== 1/4 generate-trajectories: $SAMPLES digits trajectories"
$A generate-trajectories --teacher digits --out "$DIR/trajectories" --num-samples "$SAMPLES" --shard-size 1000 --resume
$A inspect "$DIR/trajectories" | head -7

echo "== 2/4 distill ArcFlow (K=8) and 3/4 the K=1 linear baseline, $ITERS steps each"
$A distill "$DIR/trajectories" --out "$DIR/arcflow-k8" --k 8 --momentum --iters "$ITERS" --resume
$A distill "$DIR/trajectories" --out "$DIR/linear-k1" --k 1 --iters "$ITERS" --resume

echo "== 4/4 evaluate on $EVAL held-out noise seeds"
# --overwrite: the report is this script's own output, recomputed on every run (evaluate alone
# refuses to replace earlier results), so a rerun ends with the table instead of an error.
$A evaluate --adapter "$DIR/arcflow-k8" --adapter "$DIR/linear-k1" --num-samples "$EVAL" --out "$DIR/report" --overwrite
echo "main job took $(( $(date +%s) - start )) s"

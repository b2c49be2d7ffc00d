#!/bin/bash
# One sitting: our DPO and GRPO steps (prefix sharing on and off), then the
# torch and JAX libraries of ../shared/peers/ on the same shapes, ROUNDS times.
#
#   bash benchmarks/peers_sitting.sh PEERS_DIR [ROUNDS]
#
# PEERS_DIR is a scratch copy of ../shared/peers/ with its trl-venv and
# tunix-venv installed (see its README). Run it on an otherwise idle machine
# and compare ratios within the sitting only. Ours write JSON under
# PEERS_DIR/ours_<job>_<round>/; the peers print RESULT lines.
set -u
PEERS=$(cd "${1:?usage: peers_sitting.sh PEERS_DIR [ROUNDS]}" && pwd)
ROUNDS=${2:-2}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY="$REPO/.venv/bin/python"
SMALL="--hidden 256 --layers 4 --heads 8 --kv-heads 4 --vocab 1024 --batch 8 --prompt-len 32 --resp-len 32"
for round in $(seq 1 "$ROUNDS"); do
  echo "=== round $round $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd "$REPO" && "$PY" benchmarks/bench_dpo_step.py --models llama4.5m --out "$PEERS/ours_dpo_$round") | tail -8
  (cd "$PEERS" && trl-venv/bin/python trl_bench.py --which dpo --steps 12 $SMALL 2>&1 | grep RESULT)
  (cd "$PEERS" && tunix-venv/bin/python tunix_bench.py --which dpo --steps 12 $SMALL 2>&1 | grep RESULT)
  (cd "$REPO" && "$PY" benchmarks/bench_rl_step.py --out "$PEERS/ours_rl_$round") | tail -6
  (cd "$PEERS" && trl-venv/bin/python trl_bench.py --which grpo --steps 12 --num-generations 4 $SMALL 2>&1 | grep RESULT)
  (cd "$PEERS" && tunix-venv/bin/python tunix_bench.py --which grpo,rollout --steps 12 --num-generations 4 $SMALL 2>&1 \
     | grep RESULT)
  (cd "$PEERS" && trl-venv/bin/python hf_rollout_bench.py --steps 10 --warmup 2 2>&1 | grep RESULT)
done
echo "=== done $(date +%T)"

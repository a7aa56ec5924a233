#!/usr/bin/env bash
# EAGLE-3.1's fc_norm on and off for the default model, same data and steps
# (issue 17): the shipped recipe (scripts/train_default_head.sh) at a reduced
# budget, then held-out acceptance per TTT step (the trainer's eval) and tau
# on a few MT-bench questions (head only, fixed tree) for each arm.
#
#   scripts/fc_norm_ablation.sh [WORK]      # default runs/fc-norm-ablation; resumable
#
# Budget: SCALE=12 (default) keeps 1/12 of the recipe's prompts and ShareGPT
# answers at the same epochs, so both arms train on ~1/12 of the shipped
# head's tokens. Data, vocabulary and features are built once and shared.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${1:-runs/fc-norm-ablation}
SCALE=${SCALE:-12}
OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [ "$(uname -s)" = "Linux" ] && [ -e "$OPENBLAS" ]; then
  export LD_PRELOAD="$OPENBLAS${LD_PRELOAD:+:$LD_PRELOAD}"
fi
MODEL=$("$PY" -c "from eagle3_mlx.default_model import ensure_default_model as e; print(e())")
COMMON=(--model "$MODEL" --num-prompts $((275 / SCALE)) --heldout $((40 / SCALE > 4 ? 40 / SCALE : 4))
  --max-new-tokens 192 --max-prompt-tokens 320 --gen-batch 32 --temp 0
  --sharegpt-answers $((1300 / SCALE)) --answer-max-prompt-tokens 160
  --draft-vocab-size 8192 --no-vocab-prior --intermediate-size 1792
  --ttt-steps 3 --lr 1e-3 --epochs 7 --warmup 10 --batch-tokens 2048
  --eval-every 50 --ckpt-every 25 --eval-prompts 6 --eval-max-tokens 96 --no-progress)
OFF=$WORK/off; ON=$WORK/on
mkdir -p "$OFF"
echo "== $(date -u +%T) data, vocabulary, features (shared by both arms)"
for stage in data vocab features; do "$PY" -m eagle3_mlx.train.cli $stage --work-dir "$OFF" "${COMMON[@]}"; done
if [ ! -d "$ON/features" ]; then     # hard links: the second arm reads the same cached features
  mkdir -p "$ON"
  for f in "$OFF"/*; do
    case "$(basename "$f")" in train_config.json|stages.json|checkpoints|head_*|results.json|train_log.jsonl) continue;; esac
    cp -al "$f" "$ON/"
  done
  cp "$OFF/stages.json" "$ON/"        # a copy, not a link: each arm records its own stages
fi
for arm in off on; do
  flag=(); [ "$arm" = on ] && flag=(--fc-norm)
  echo "== $(date -u +%T) fit, export, eval: fc_norm $arm"
  for stage in fit export eval; do
    "$PY" -m eagle3_mlx.train.cli $stage --work-dir "$WORK/$arm" "${COMMON[@]}" "${flag[@]}"
  done
done
for arm in off on; do
  echo "== $(date -u +%T) MT-bench tau, fc_norm $arm (first 4 questions, 96 tokens, head only, tree 2,1,4)"
  "$PY" -m eagle3_mlx.cli bench --model "$MODEL" --draft "$WORK/$arm/head_mlx" --prompts mtbench \
    --limit 4 --max-tokens 96 --draft-source eagle --tree 2,1,4 --json "$WORK/bench-$arm.json" --no-progress
done
echo "== $(date -u +%T) done; held-out acceptance per TTT step in $WORK/{off,on}/results.json"

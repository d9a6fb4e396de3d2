#!/usr/bin/env bash
# End-to-end demo on SmolLM2-135M from a fresh clone: fetch the model, build, apply the first
# N CounterFact edits sequentially with O-Edit (checkpointed after each), then evaluate them.
#   usage: scripts/demo.sh [N]   (default 10; the run directory is demo-run/, resumable)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-10}"
scripts/fetch-model.sh
cargo build --release --locked
oedit="${CARGO_TARGET_DIR:-target}/release/oedit"
"$oedit" generate --model smollm2-135m --prompt "The mother tongue of Danielle Darrieux is" --max-tokens 8
"$oedit" edit --model smollm2-135m --edits data/counterfact-sample.jsonl --run demo-run --limit "$n"
"$oedit" eval --model smollm2-135m --run demo-run --edits data/counterfact-sample.jsonl \
  --metrics efficacy,generalization,locality --json demo-run/eval.json
"$oedit" export --run demo-run --out demo-run/model
"$oedit" generate --model demo-run/model --prompt "The mother tongue of Danielle Darrieux is" --max-tokens 8
echo "eval report: demo-run/eval.json; edited model: demo-run/model" >&2

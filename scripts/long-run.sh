#!/usr/bin/env bash
# Long sequential run: N CounterFact edits (default 2000, case_id order) on SmolLM2-135M with
# O-Edit, then the evaluation of all of them on the final model. Resumable: re-run the same
# command after an interruption and it continues after the last checkpointed edit.
#   usage: scripts/long-run.sh [N] [RUN_DIR] [EDITS]
#   defaults: 2000, runs/cf-oedit-2000, ../shared/data/counterfact.jsonl (data/counterfact-sample.jsonl if absent)
# At ~4.6 s per edit (2 threads) 2,000 edits take about 2.5 hours. The subspace reaches its cap
# (0.9 × 1536 = 1382 directions) after 1382 edits and is then compressed (see docs/method.md);
# log.jsonl's `subspace_compressed_away` shows where.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-2000}"
run="${2:-runs/cf-oedit-$n}"
edits="${3:-../shared/data/counterfact.jsonl}"
[ -f "$edits" ] || edits=data/counterfact-sample.jsonl
scripts/fetch-model.sh
cargo build --release --locked
oedit=target/release/oedit
"$oedit" edit --model smollm2-135m --edits "$edits" --run "$run" --limit "$n" --on-invalid skip
"$oedit" eval --model smollm2-135m --run "$run" --edits "$edits" --json "$run/eval.json"
python3 - "$run/log.jsonl" <<'PY'
import json, sys
log = [json.loads(l) for l in open(sys.argv[1])]
secs = sorted(e["seconds"] for e in log)
print(f"{len(log)} edits; target wins right after the edit: {sum(e['target_wins'] for e in log) / len(log):.3f}; "
      f"median {secs[len(secs) // 2]:.2f} s/edit; final basis size {log[-1]['basis_size']}; "
      f"compressions: {sum(1 for e in log if e['subspace_compressed_away'])}")
PY

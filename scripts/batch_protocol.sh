#!/usr/bin/env bash
# The published batched-editing protocol on SmolLM2-135M: N CounterFact edits (default 2,000, in
# file order) applied in batches of B (default 100) with each of alphaedit, memit, oedit-plus and
# oedit-soft, then every edited record evaluated on each method's final model (efficacy,
# generalization, locality, fluency; and greedy decoding: gen_efficacy, gen_generalization,
# gen_locality), and a table of the results. Resumable: re-run the same
# command after an interruption; each run directory continues after its last checkpointed batch
# (the batch size is recorded in the run and must not change).
#   usage: scripts/batch_protocol.sh [N] [B] [OUT] [EDITS]
#   defaults: 2000, 100, runs/batch-N-B, ../shared/data/counterfact.jsonl
#   env: OEDIT (binary; default: built with cargo into target/release/oedit), THREADS (default 2),
#        METHODS (default "alphaedit memit oedit-plus oedit-soft"), MODEL (default smollm2-135m),
#        HPARAMS (a hyper-parameters file; default the model preset's)
# Cost: the v* optimisation dominates as in sequential editing (several s per record on 2 cores),
# so N = 2,000 takes hours per method; N = 20, B = 10 checks the pipeline in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-2000}"
b="${2:-100}"
out="${3:-runs/batch-$n-$b}"
edits="${4:-../shared/data/counterfact.jsonl}"
threads="${THREADS:-2}"
methods="${METHODS:-alphaedit memit oedit-plus oedit-soft}"
model="${MODEL:-smollm2-135m}"
hp_args=()
[ -n "${HPARAMS:-}" ] && hp_args=(--hparams "$HPARAMS")
if [ ! -f "$edits" ]; then
    echo "error: $edits: no such file (give the CounterFact JSONL as the 4th argument)" >&2
    exit 2
fi
if [ -z "${OEDIT:-}" ]; then
    scripts/fetch-model.sh
    cargo build --release --locked
    OEDIT="${CARGO_TARGET_DIR:-target}/release/oedit"
fi
mkdir -p "$out"
for m in $methods; do
    run="$out/$m"
    echo "== $m: $n edits in batches of $b -> $run" >&2
    "$OEDIT" --threads "$threads" edit --model "$model" "${hp_args[@]}" --edits "$edits" --run "$run" \
        --method "$m" --batch-size "$b" --limit "$n" --on-invalid skip --json >> "$run.edit.jsonl"
    "$OEDIT" --threads "$threads" eval --model "$model" --run "$run" --edits "$edits" \
        --metrics efficacy,generalization,locality,fluency,gen --json "$run/eval.json"
done
python3 - "$out" $methods <<'PY'
import json, os, sys
out, methods = sys.argv[1], sys.argv[2:]
keys = ["efficacy", "generalization", "locality", "locality_agreement", "fluency",
        "gen_efficacy", "gen_generalization", "gen_locality"]
rows = []
for m in methods:
    rep = json.load(open(os.path.join(out, m, "eval.json")))
    log = [json.loads(l) for l in open(os.path.join(out, m, "log.jsonl"))]
    ed, un = rep["metrics"]["edited"], rep["metrics"]["unedited"]
    cell = lambda side, k: f"{side[k]['mean']:.3f}" if side.get(k) and side[k].get("mean") is not None else "-"
    wins = sum(e["target_wins"] for e in log) / max(len(log), 1)
    # Right after the joint update: an edit that took further attempts logs the first in `landing`.
    joint = sum(e["landing"][0]["target_wins"] if e.get("landing") else e["target_wins"] for e in log)
    joint /= max(len(log), 1)
    rows.append((m, len(log), joint, wins, [cell(ed, k) for k in keys], [cell(un, k) for k in keys]))
lines = ["| method | edits | target wins after the joint update | after its batch's landing | "
         + " | ".join(keys) + " |",
         "|---|---|---|---|" + "---|" * len(keys)]
for m, n, joint, wins, ed, un in rows:
    lines.append(f"| {m} | {n} | {joint:.3f} | {wins:.3f} | " + " | ".join(ed) + " |")
if rows:
    lines.append(f"| unedited | {rows[0][1]} | | | " + " | ".join(rows[0][5]) + " |")
table = "\n".join(lines)
print(table)
open(os.path.join(out, "summary.md"), "w").write(table + "\n")
PY

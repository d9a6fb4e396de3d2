#!/usr/bin/env bash
# Times `oedit edit --method rome` against a plain PyTorch reference of the same edit
# (rome_edit.py) on the first N CounterFact records, with the same templates, hyper-parameters
# and key statistics, and checks that both reach the same outcome.
#
# From a fresh clone:   scripts/fetch-model.sh && cargo build --release \
#                       && scripts/pytorch_reference/compare.sh
#
# Environment:
#   N=10            edits to time (the first N lines of data/counterfact-sample.jsonl)
#   THREADS=2       oedit --threads and torch.set_num_threads
#   MODEL=smollm2-135m
#   EDITS=data/counterfact-sample.jsonl
#   WORK=<tmp dir>  where the export and the runs go (removed at the end unless KEEP=1)
#   OMP_WAIT_POLICY=PASSIVE  (default here) torch's OpenMP threads sleep instead of spinning
#                   between parallel regions. On a machine whose cores are busy with other work,
#                   spinning threads that wait on a descheduled peer made torch ~10x slower
#                   (2 threads: 9.6 s instead of 0.8 s per forward); on an idle machine the
#                   difference is negligible. Set OMP_WAIT_POLICY=ACTIVE to measure torch's default.
#
# The key statistics are computed (and cached) by a 1-edit warm-up run in another run
# directory first, so the timed oedit run only loads them; oedit's times are the `seconds` of its
# log.jsonl (per edit: target probability before, key, value, update, probability after,
# checkpoint), the reference's are the same span per edit (it checkpoints nothing).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$repo/scripts/pytorch_reference"
N="${N:-10}"
THREADS="${THREADS:-2}"
MODEL="${MODEL:-smollm2-135m}"
EDITS="${EDITS:-$repo/data/counterfact-sample.jsonl}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
oedit="$repo/target/release/oedit"

if [ ! -x "$oedit" ]; then
    echo "compare.sh: $oedit not found; run: cargo build --release" >&2
    exit 2
fi

bash "$here/setup.sh"
py="$repo/.venv-ref/bin/python"

if [ -n "${WORK:-}" ]; then
    mkdir -p "$WORK"
    work="$WORK"
else
    work="$(mktemp -d "${TMPDIR:-/tmp}/oedit-ref-compare.XXXXXX")"
fi
cleanup() { if [ "${KEEP:-0}" != 1 ] && [ -z "${WORK:-}" ]; then rm -rf "$work"; fi; }
trap cleanup EXIT
rm -rf "$work/hf" "$work/warmup" "$work/run"

echo "== work folder: $work"
echo "== load average at start: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores (timings are only comparable on an otherwise idle machine)"
echo "== exporting $MODEL to $work/hf"
"$oedit" --threads "$THREADS" export --model "$MODEL" --out "$work/hf"

echo "== warm-up: 1 edit (computes or loads the key statistics)"
"$oedit" --threads "$THREADS" edit --method rome --model "$MODEL" --edits "$EDITS" \
    --run "$work/warmup" --limit 1 --json > /dev/null

echo "== oedit: $N edits (--method rome, --threads $THREADS)"
"$oedit" --threads "$THREADS" edit --method rome --model "$MODEL" --edits "$EDITS" \
    --run "$work/run" --limit "$N" --json > "$work/oedit.jsonl"

echo "== PyTorch reference: $N edits (torch threads $THREADS, OMP_WAIT_POLICY=$OMP_WAIT_POLICY)"
"$py" "$here/rome_edit.py" --model "$work/hf" --run "$work/run" --edits "$EDITS" --limit "$N" \
    --threads "$THREADS" --save-factors "$work/ref-factors.safetensors" > "$work/ref.jsonl"

echo "== load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== comparison (oedit / pytorch)"
"$py" "$here/summarize.py" "$work/run" "$work/ref.jsonl" --factors "$work/ref-factors.safetensors"

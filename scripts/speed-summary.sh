#!/usr/bin/env bash
# One-screen speed summary on SmolLM2-135M: runs the edit benchmark (BENCH_EDITS edits, default 10;
# BENCH_EVAL_RECORDS evaluated records, default 1000; BENCH_THREADS, default 2) and prints the
# figures the speed issue tracks. Needs an otherwise idle machine for meaningful numbers.
# With RUN_DIR=<run directory> (e.g. a 1,000-edit sweep run) it also prints the peak resident
# memory over that run from its log (`peak_rss_mb` of every edit), and skips nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
export BENCH_EDITS="${BENCH_EDITS:-10}"
out="$(mktemp)"
cargo bench --locked --bench edit 2>/dev/null | sed -n '/^{/,$p' > "$out"
python3 - "$out" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
e, s, v = b["edit"], b["stats"], b["eval"]
peak = 480.0  # GFLOP/s, 2 cores x AVX-512 FMA (measured, see docs)
print(f"oedit speed summary ({b['model']}, {b['threads']} threads)")
print(f"  seconds per O-Edit edit (median of {e['edits']}): {e['median_seconds']:.2f}   target <= 5")
ph = e["median_phase_seconds"]
print(f"    k* {ph['key']:.3f} s | v* {ph['value']:.3f} s | update {ph['update']:.4f} s | checkpoint {ph['checkpoint']:.4f} s")
print(f"  v* step: {e['median_step_seconds']:.3f} s, {e['median_step_gflops']:.1f} GFLOP/s = {100 * e['median_step_gflops'] / peak:.0f}% of ~{peak:.0f} peak")
print(f"  forward 11x20: {b['forward_11x20_seconds']:.3f} s")
print(f"  key statistics: {s['tokens_per_second']:.0f} tokens/s ({s['tokens']} tokens in {s['seconds']:.1f} s, then cached)")
print(f"  evaluation: {v['records_per_second']:.2f} records/s ({v['records']} records, 3 metrics, one model)")
PY
rm -f "$out"
if [ -n "${RUN_DIR:-}" ]; then
    python3 - "$RUN_DIR/log.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rss = [r["peak_rss_mb"] for r in rows if r.get("peak_rss_mb") is not None]
if rss:
    q = max(1, len(rss) // 10)
    print(f"  peak RSS over {len(rss)} edits of {sys.argv[1]}: {max(rss):.0f} MB "
          f"(first {q} edits: {max(rss[:q]):.0f} MB, last {q}: {max(rss[-q:]):.0f} MB)   target < 1500, flat")
PY
fi

#!/usr/bin/env bash
# CUDA check, run from the repository root on the GPU machine (python3 with PyTorch there draws
# the random weights): the same 5 CounterFact edits and their evaluation on CUDA and on CPU, on
# one random SmolLM2-shaped model (f32), must agree; then 3 edits on a random Llama-2-7B-shaped
# model (bf16) are timed (SKIP_7B=1 skips them), then batched edits on it: BATCHES="B:N ..." runs N
# records at --batch-size B for each pair (default "10:20 100:100"; empty skips). SMOL_EDITS (default
# 5) sets the size of the agreement check (SKIP_SMOL=1 skips it), COV_TOKENS_7B (default 100000) the 7B key statistics.
# Results under OUT (default /tmp/oedit-cuda-check).
#   usage: BUNDLE=DIR scripts/cuda/check.sh     (DIR from scripts/cuda/bundle.sh)
set -uo pipefail
: "${BUNDLE:?BUNDLE=DIR (from scripts/cuda/bundle.sh)}"
OUT="${OUT:-/tmp/oedit-cuda-check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
. scripts/cuda/env.sh
ldd "$O" | grep -E "not found|libcuda|cublas|curand|nvrtc"
if [ "${SKIP_SMOL:-0}" != 1 ]; then
python3 "$BUNDLE/gen_random_llama.py" /tmp/m-smol smol
head -"${SMOL_EDITS:-5}" data/counterfact-sample.jsonl > /tmp/e5.jsonl
common=(edit --model /tmp/m-smol --hparams configs/smollm2-135m.json --dtype f32 --edits /tmp/e5.jsonl --json)
for dev in cuda cpu; do
  rm -rf "/tmp/r-$dev"
  timeout 300 "$O" "${common[@]}" --device "$dev" --run "/tmp/r-$dev" > "$OUT/edit-$dev.jsonl"; echo "edit $dev rc=$?"
  timeout 300 "$O" eval --model /tmp/m-smol --dtype f32 --run "/tmp/r-$dev" --device "$dev" --edits /tmp/e5.jsonl \
    --metrics efficacy,generalization,locality,fluency --no-cache --json "$OUT/eval-$dev.json" >/dev/null
  echo "eval $dev rc=$?"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {d: [json.loads(l) for l in open(f"{out}/edit-{d}.jsonl") if '"index"' in l] for d in ("cuda", "cpu")}
worst = 0.0
for a, b in zip(rows["cuda"], rows["cpu"]):
    rel = abs(a["update_norm"] - b["update_norm"]) / b["update_norm"]
    worst = max(worst, rel, abs(a["loss_last"] - b["loss_last"]))
    print(f"edit {a['index']}: loss_last {a['loss_last']:.5f} (cuda) {b['loss_last']:.5f} (cpu), "
          f"update norm {a['update_norm']:.4f} / {b['update_norm']:.4f}, {a['seconds']:.2f} s / {b['seconds']:.2f} s")
ev = {d: json.load(open(f"{out}/eval-{d}.json"))["metrics"]["edited"] for d in ("cuda", "cpu")}
for m in ev["cpu"]:
    worst = max(worst, abs(ev["cuda"][m]["mean"] - ev["cpu"][m]["mean"]))
print(f"largest CUDA/CPU difference: {worst:.2e}")
sys.exit(0 if worst < 1e-3 else 1)
PY
echo "agreement rc=$?"
fi
[ "${SKIP_7B:-0}" = 1 ] && exit 0
python3 "$BUNDLE/gen_random_llama.py" /tmp/m-7b 7b
head -3 data/counterfact-sample.jsonl > /tmp/e3.jsonl
python3 -c "import json; p=json.load(open('configs/llama-2-7b.json')); p['hparams']['cov_tokens']=${COV_TOKENS_7B:-100000}; json.dump(p, open('/tmp/hp7b.json','w'))"
rm -rf /tmp/r-7b
timeout 300 "$O" edit --model /tmp/m-7b --hparams /tmp/hp7b.json --dtype bf16 --device cuda --edits /tmp/e3.jsonl \
  --run /tmp/r-7b --json > "$OUT/edit-7b.jsonl"; echo "7b edit rc=$?"
python3 -c "
import json
for l in open('$OUT/edit-7b.jsonl'):
    e = json.loads(l)
    if 'index' in e: print(f\"7B-shaped edit {e['index']}: {e['seconds']:.2f} s, {e['steps']} v* steps, phases {e['phases']}\")
"
for pair in ${BATCHES-10:20 100:100}; do
  b=${pair%%:*}; n=${pair##*:}
  rm -rf "/tmp/r-7b-b$b"
  t0=$(date +%s.%N)
  timeout 600 "$O" edit --model /tmp/m-7b --hparams /tmp/hp7b.json --dtype bf16 --device cuda \
    --edits data/counterfact-sample.jsonl --limit "$n" --batch-size "$b" --run "/tmp/r-7b-b$b" --json \
    > "$OUT/edit-7b-b$b.jsonl"; rc=$?
  echo "7b batch $b x $n records rc=$rc, $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s with loading and statistics"
  python3 - "$OUT/edit-7b-b$b.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"index"' in l]
if rows:
    # Every record of a batch logs its batch's seconds and phases.
    batches = {r.get("batch", r["index"]): r for r in rows}
    total = sum(r["seconds"] for r in batches.values())
    wins = sum(1 for r in rows if r.get("target_wins"))
    print(f"  {len(rows)} records in {len(batches)} batches, {total:.1f} s of edit time, "
          f"{total / len(rows):.3f} s per edit, {len(rows) / total:.2f} edits/s, "
          f"target wins right after {wins}/{len(rows)}")
    for b, r in batches.items():
        print(f"  batch {b}: {r['seconds']:.2f} s, phases {r['phases']}, v* steps {r['steps']}")
PY
done

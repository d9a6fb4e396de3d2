#!/usr/bin/env bash
# A Llama-2-7B-shaped model on the CPU: builds a random-weight bf16 model laid out like the hub's
# (config.json, two safetensors shards + model.safetensors.index.json, a 32,000-token
# tokenizer.json cut from SmolLM2's), then runs 3 `oedit-plus` edits on it in two sessions
# (2 edits, then a resume for the third), timed with /usr/bin/time -v and OEDIT_TIMINGS=1.
#
#   usage: scripts/llama7b_cpu.sh [OUT]        (default OUT: /tmp/oedit-llama7b-cpu)
#   env:   COV_TOKENS (default 2048), V_STEPS (default 5): the only hyper-parameters changed
#          from configs/llama-2-7b.json (200,000 and 25), to keep the run affordable;
#          THREADS (default: the number of cores); KEEP_MODEL=1 reuses an existing OUT/model.
#
# Needs ~14 GB of disk for the model, ~1.5 GB for the caches, and ~16 GB of free RAM (peak RSS
# 15.2 GiB: the 13.1 GiB model plus three f×f f64 matrices while the method state is built).
# Measured figures and logs: bench-results/llama7b-cpu/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/oedit-llama7b-cpu}"
cov="${COV_TOKENS:-2048}"
steps="${V_STEPS:-5}"
threads="${THREADS:-$(nproc)}"
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$out"

cargo build --release --quiet
cargo build --release --quiet --example random_llama
oedit="$target/release/oedit"

# 1. The model: a Llama-2-7B config and random bf16 weights, streamed one tensor at a time.
if [ "${KEEP_MODEL:-0}" != 1 ] || [ ! -f "$out/model/model.safetensors.index.json" ]; then
  scripts/fetch-model.sh >/dev/null
  rm -rf "$out/smol" "$out/model"
  "$oedit" export --model smollm2-135m --dtype bf16 --out "$out/smol" >/dev/null
  /usr/bin/time -v "$target/release/examples/random_llama" "$out/model" \
    --tokenizer "$out/smol/tokenizer.json" 2> "$out/generate.time"
  rm -rf "$out/smol"
fi

# 2. The preset's hyper-parameters with fewer statistics tokens and v* steps; 3 CounterFact edits.
python3 - "$cov" "$steps" "$out/hparams.json" <<'PY'
import json, sys
p = json.load(open("configs/llama-2-7b.json"))
p["hparams"]["cov_tokens"] = int(sys.argv[1])
p["hparams"]["v_steps"] = int(sys.argv[2])
json.dump(p, open(sys.argv[3], "w"), indent=1)
PY
head -n 3 data/counterfact-sample.jsonl > "$out/edits.jsonl"

# 3. Two sessions on a fresh cache: the first computes the statistics and the Cholesky factor
#    and makes 2 edits; the second resumes (reading both from the caches) and makes the third.
rm -rf "$out/run" "$out/cache"
for s in 1 2; do
  limit=(); [ "$s" = 1 ] && limit=(--limit 2)
  OEDIT_CACHE="$out/cache" OEDIT_TIMINGS=1 /usr/bin/time -v "$oedit" --threads "$threads" edit \
    --model "$out/model" --hparams "$out/hparams.json" --dtype bf16 --edits "$out/edits.jsonl" \
    --run "$out/run" "${limit[@]}" --json > "$out/session$s.jsonl" 2> "$out/session$s.err"
  echo "session $s:"
  grep -E '^timing:|Maximum resident|Elapsed \(wall' "$out/session$s.err" | sed 's/^\s*/  /'
  python3 - "$out/session$s.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    if "index" in e:
        p = e["phases"]
        print(f"  edit {e['index']}: {e['seconds']:.1f} s (k* {p['key']:.1f}, v* {p['value']:.1f} in {e['steps']} steps, "
              f"update {p['update']:.2f}, checkpoint {p['checkpoint']:.2f}), peak RSS {e['peak_rss_mb']:.0f} MiB")
PY
done
ls -la "$out/cache"/stats "$out/cache"/stats/factors

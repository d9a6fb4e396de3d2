#!/usr/bin/env bash
# Packs what check.sh needs on a GPU machine that has no Rust and no model: the CUDA build of
# oedit (xz, ~9 MB), and SmolLM2's tokenizer and config (weights are drawn at random there).
#   usage: scripts/cuda/bundle.sh DIR   (after scripts/cuda/build-without-toolkit.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="$1"
mkdir -p "$out"
scripts/fetch-model.sh
tmp=$(mktemp -d)
target/release/oedit export --model smollm2-135m --dtype bf16 --out "$tmp" >/dev/null 2>&1 \
  || cargo run --release --quiet -- export --model smollm2-135m --dtype bf16 --out "$tmp"
cp "$tmp/tokenizer.json" "$tmp/tokenizer_config.json" "$out/"
cp "$tmp/config.json" "$out/smol-config.json"
rm -rf "$tmp"
strip -o "$out/oedit" target/cuda/release/oedit
xz -6 -f "$out/oedit"
cp scripts/cuda/gen_random_llama.py "$out/"
du -sh "$out"

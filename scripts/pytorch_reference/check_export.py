#!/usr/bin/env python3
"""Checks that an `oedit export` folder loads in Hugging Face transformers and behaves like oedit.

    .venv-ref/bin/python scripts/pytorch_reference/check_export.py DIR [--oedit BIN]
        [--expect PROMPT ANSWER_PREFIX] ... [--threads 2]

Checks (each printed as one JSON line; exit status 1 when one fails):
  tokenizer   AutoTokenizer ids of "The mother tongue of Danielle Darrieux is" are the SmolLM2 ids
  nll         mean NLL of a fixed paragraph under transformers equals `oedit score --model DIR`
              (and, with --reference-nll, a given value)
  generate    the greedy continuation of each --expect prompt starts with its answer prefix
              (default: "The capital of France is" -> " Paris"); also compared with
              `oedit generate --model DIR` when the binary is available
The last line is a summary {"check": "summary", "passed": N, "failed": N, ...}.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PARAGRAPH = (
    "Paris is the capital and most populous city of France. Situated on the Seine River, in the north "
    "of the country, it is at the heart of the Ile-de-France region. The city is a major railway, "
    "highway and air-transport hub served by two international airports. Paris is known for its "
    "museums and architectural landmarks: the Louvre received 8.9 million visitors in 2023."
)
TOKENIZER_PROMPT = "The mother tongue of Danielle Darrieux is"
TOKENIZER_IDS = [504, 3379, 10663, 282, 10789, 290, 9117, 3153, 4808, 314]
REPO = Path(__file__).resolve().parents[2]


def emit(results, check, ok, **fields):
    row = {"check": check, "ok": bool(ok), **fields}
    results.append(row)
    print(json.dumps(row), flush=True)


def load(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = sorted(p.name for p in Path(folder).iterdir())
    tok = AutoTokenizer.from_pretrained(folder)
    try:  # transformers >= 4.56 calls it `dtype`; older versions only know `torch_dtype`.
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    return tok, model, files


def oedit_json(binary, args, threads):
    cmd = [str(binary), "--threads", str(threads), *args, "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def transformers_quiet():
    """No weight-loading progress bars on stderr (they would clutter logs)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="Hugging Face folder written by `oedit export`")
    ap.add_argument("--oedit", default=str(REPO / "target" / "release" / "oedit"),
                    help="oedit binary for the cross-checks (skipped when it does not exist)")
    ap.add_argument("--expect", nargs=2, action="append", metavar=("PROMPT", "PREFIX"),
                    help="greedy continuation of PROMPT must start with PREFIX (repeatable; "
                         "default: 'The capital of France is' ' Paris')")
    ap.add_argument("--reference-nll", type=float, default=None,
                    help="also require the paragraph's mean NLL to be within --tolerance of this value")
    ap.add_argument("--tolerance", type=float, default=2e-3, help="allowed |NLL difference| (default 2e-3)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    expects = args.expect or [["The capital of France is", " Paris"]]

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers_quiet()
    results = []
    t0 = time.time()
    tok, model, files = load(args.folder)
    specials = {"bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token}
    emit(results, "load", True, files=files, tokenizer_class=type(tok).__name__,
         special_tokens=specials, torch=torch.__version__, transformers=transformers.__version__,
         seconds=round(time.time() - t0, 2))

    # 1. Tokenizer.
    ids = tok(TOKENIZER_PROMPT)["input_ids"]
    emit(results, "tokenizer", ids == TOKENIZER_IDS, prompt=TOKENIZER_PROMPT, ids=ids, expected=TOKENIZER_IDS)

    # 2. Mean NLL of the paragraph (the same convention as `oedit score`: every token but the
    #    first is predicted; mean over those predictions).
    ids = tok(PARAGRAPH, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -lp.gather(1, ids[0, 1:].unsqueeze(1)).mean().item()
    fields = {"tokens": ids.shape[1] - 1, "mean_nll_transformers": round(nll, 6)}
    ok = True
    have_oedit = Path(args.oedit).is_file() and os.access(args.oedit, os.X_OK)
    if have_oedit:
        s = oedit_json(args.oedit, ["score", "--model", args.folder, "--text", PARAGRAPH], args.threads)
        fields.update(tokens_oedit=s["tokens"], mean_nll_oedit=round(s["mean_nll"], 6),
                      abs_diff=abs(s["mean_nll"] - nll))
        ok &= s["tokens"] == ids.shape[1] - 1 and abs(s["mean_nll"] - nll) <= args.tolerance
    else:
        fields["oedit"] = f"not found at {args.oedit}; cross-check skipped"
    if args.reference_nll is not None:
        fields["reference_nll"] = args.reference_nll
        ok &= abs(args.reference_nll - nll) <= args.tolerance
    emit(results, "nll", ok, **fields)

    # 3. Greedy generations.
    pad = tok.pad_token_id if tok.pad_token_id is not None else model.config.eos_token_id
    for prompt, prefix in expects:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
        completion = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        fields = {"prompt": prompt, "expected_prefix": prefix, "completion_transformers": completion}
        ok = completion.startswith(prefix)
        if have_oedit:
            g = oedit_json(args.oedit, ["generate", "--model", args.folder, "--prompt", prompt,
                                        "--max-tokens", str(args.max_new_tokens)], args.threads)
            fields["completion_oedit"] = g["completion"]
            fields["same_as_oedit"] = g["completion"] == completion
            ok &= g["completion"] == completion
        emit(results, "generate", ok, **fields)

    failed = [r["check"] for r in results if not r["ok"]]
    print(json.dumps({"check": "summary", "passed": len(results) - len(failed), "failed": len(failed),
                      "failed_checks": failed, "seconds": round(time.time() - t0, 1)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

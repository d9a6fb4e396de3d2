#!/usr/bin/env python3
"""How the size of each edit's update (‖ΔW‖_F, the whole change of an edit over its landing
attempts) develops along a sequential run, split by edits that landed on their first update and
edits that needed further attempts, per window of edits.

usage: update_growth.py LOG [LOG ...] [--window N]

LOG is a run's log.jsonl or its trimmed copy (bench-results/*/landing-logs/LABEL.jsonl). Prints a
Markdown table per log: edits in the window, edits with > 1 attempt, mean ‖ΔW‖ of each kind and
of all, and the share of Σ‖ΔW‖² (the window's squared change, what adds up as leak onto other
keys) that the multi-attempt edits carry; where the log has each attempt's gain (live logs, and
trimmed logs exported since session 30), also the further attempts' median gain and how many
reached 3 and 10 (the presets' cap, `landing.max_gain`, is 3 since session 30 and was 10 before). Only the Python standard library.
"""
import json
import os
import statistics as st
import sys


def further_gains(e):
    """The gains of an edit's attempts after its first update (live log or trimmed copy)."""
    gains = e.get("gains") or [a["gain"] for a in e.get("landing", [])]
    return gains[1:]


def table(path, window):
    log = [json.loads(l) for l in open(path) if l.strip()]
    has_gains = any("gains" in e or "landing" in e for e in log)
    print(f"### {path}\n")
    print("| edits | > 1 attempt | mean ‖ΔW‖, 1 attempt | mean ‖ΔW‖, > 1 attempt | mean ‖ΔW‖, all "
          "| share of Σ‖ΔW‖² from > 1 attempt |" + (" further attempts: median gain, ≥ 3, ≥ 10 |" if has_gains else ""))
    print("|---|---|---|---|---|---|" + ("---|" if has_gains else ""))
    for a in range(0, len(log), window):
        w = log[a:a + window]
        one = [e["update_norm"] for e in w if e.get("attempts", 1) == 1]
        more = [e["update_norm"] for e in w if e.get("attempts", 1) > 1]
        sq_more, sq_all = sum(x * x for x in more), sum(e["update_norm"] ** 2 for e in w)
        mean = lambda xs: f"{st.mean(xs):.1f}" if xs else "–"
        row = (f"| {a + 1}–{a + len(w)} | {len(more)} | {mean(one)} | {mean(more)} "
               f"| {mean([e['update_norm'] for e in w])} | {sq_more / sq_all:.2f} |")
        if has_gains:
            g = [x for e in w for x in further_gains(e)]
            row += (f" {st.median(g):.2f}, {sum(x >= 3 - 1e-9 for x in g)}, {sum(x >= 10 - 1e-9 for x in g)} |"
                    if g else " – |")
        print(row)
    print()


if __name__ == "__main__":
    args = sys.argv[1:]
    window = 500
    if "--window" in args:
        i = args.index("--window")
        window = int(args[i + 1])
        del args[i:i + 2]
    if not args or not all(os.path.isfile(p) for p in args):
        sys.exit(__doc__)
    for p in args:
        table(p, window)

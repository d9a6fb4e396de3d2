#!/usr/bin/env python3
"""Landing rate right after each edit, from the log.jsonl of `oedit edit` runs.

usage: summarize.py RUN_DIR [RUN_DIR ...]

For each run: edits, target_wins after the edit (with landing, as logged), the same after the
first update alone (logged in `landing[0]` when an edit took several attempts; an edit with one
attempt is its own first update), the attempts, the final margins and update norms.
"""
import json
import statistics as st
import sys


def first_wins(e):
    if e.get("attempts", 1) > 1 and e.get("landing"):
        return e["landing"][0]["target_wins"]
    return e["target_wins"]


def main(dirs):
    print("| run | edits | target wins after the edit | after its first update | edits with > 1 attempt | max attempts | median / min margin | median update norm |")
    print("|---|---|---|---|---|---|---|---|")
    for d in dirs:
        log = [json.loads(l) for l in open(f"{d}/log.jsonl") if l.strip()]
        if not log:
            continue
        n = len(log)
        wins = sum(e["target_wins"] for e in log)
        first = sum(first_wins(e) for e in log)
        att = [e.get("attempts", 1) for e in log]
        m = [e["margin"] for e in log if e.get("margin") is not None]
        margin = f"{st.median(m):.2f} / {min(m):.2f}" if m else "–"
        norm = st.median(e["update_norm"] for e in log)
        print(f"| {d.rstrip('/').split('/')[-1]} | {n} | {wins} ({100 * wins / n:.1f}%) | {first} ({100 * first / n:.1f}%) "
              f"| {sum(a > 1 for a in att)} | {max(att)} | {margin} | {norm:.2f} |")
    for d in dirs:
        for l in open(f"{d}/log.jsonl"):
            e = json.loads(l)
            if e.get("attempts", 1) > 1 or not e["target_wins"]:
                steps = [(a.get("margin"), a.get("gain"), a.get("update_norm")) for a in e.get("landing", [])]
                fmt = ", ".join(f"m {x:.2f} g {g:.2f} ‖ΔW‖ {u:.2f}" if x is not None else "m – " for x, g, u in steps)
                print(f"- {d.rstrip('/').split('/')[-1]} edit {e['index']} (case_id {e['case_id']}, {e['subject']} → "
                      f"{e['target_new']}): attempts {e.get('attempts', 1)}, wins {e['target_wins']}, margin "
                      f"{e.get('margin')}; per attempt: {fmt}")


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env python3
"""Tables of a lifelong-editing sweep (bench-results/lifelong, bench-results/lifelong-dev) from its
reports (LABEL-N.json, written by scripts/bench_sweep.py), its run logs (runs/LABEL/log.jsonl,
when present, else the committed trimmed copies landing-logs/LABEL.jsonl) and its oldest-edit
reports (oldest/LABEL-N-first100.json).

usage: lifelong_tables.py DIR [DIR ...]
       lifelong_tables.py --export-landing DIR   (write DIR/landing-logs/LABEL.jsonl from runs/, keeping
                                             the committed lines the live run reproduces)

The run directories are not committed (they hold each edit's update); the trimmed logs keep, per
edit, what the landing table needs (and each landing attempt's gain), so the table can be
rebuilt from a fresh clone.

Prints Markdown: per DIR, (1) every report with both evaluation protocols, the unedited model
first at each N; (2) the landing right after each edit from the logs; (3) the oldest 100 edits.
Only the Python standard library.
"""
import glob
import json
import os
import re
import statistics as st
import sys

TF = ["efficacy", "generalization", "locality", "locality_agreement", "fluency"]
GEN = ["gen_efficacy", "gen_generalization", "gen_locality"]


def means(path, side="edited"):
    m = json.load(open(path))["metrics"][side] or {}
    return {k: v["mean"] for k, v in m.items() if isinstance(v, dict) and "mean" in v}


def fmt(d, keys):
    return " / ".join(f"{d[k]:.3f}" if k in d else "–" for k in keys)


def reports(d):
    out = []
    for p in glob.glob(os.path.join(d, "*.json")):
        m = re.fullmatch(r"(.+)-(\d+)\.json", os.path.basename(p))
        if m and not os.path.basename(p).startswith("hparams-"):
            out.append((int(m.group(2)), m.group(1), p))
    return sorted(out)


def main_table(d):
    print("| method | N | efficacy / generalization / neighbourhood / agreement / fluency (teacher-forced) "
          "| gen efficacy / gen generalization / gen locality (greedy decoding) |")
    print("|---|---|---|---|")
    seen = set()
    for n, label, p in reports(d):
        if n not in seen:
            seen.add(n)
            u = means(p, "unedited")
            print(f"| unedited | {n} | {fmt(u, TF)} | {fmt(u, GEN)} |")
        e = means(p)
        print(f"| {label} | {n} | {fmt(e, TF)} | {fmt(e, GEN)} |")


TRIMMED = ["index", "case_id", "attempts", "target_wins", "margin", "update_norm", "seconds", "steps"]


def first_wins(e):
    if "first_update_wins" in e:
        return e["first_update_wins"]
    if e.get("attempts", 1) > 1 and e.get("landing"):
        return e["landing"][0]["target_wins"]
    return e["target_wins"]


def live_run_logs(d):
    """{label: path} of the logs in the run directories still present (runs/LABEL/log.jsonl)."""
    return {p.split(os.sep)[-2]: p for p in glob.glob(os.path.join(d, "runs", "*", "log.jsonl"))}


def line_count(path):
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def run_logs(d):
    """(label, path) of every run's log: the live run directory's, else the trimmed copy; the
    trimmed copy also wins while a live run restarted from scratch has fewer edits than it."""
    logs = live_run_logs(d)
    for p in glob.glob(os.path.join(d, "landing-logs", "*.jsonl")):
        label = os.path.basename(p)[: -len(".jsonl")]
        if label not in logs or line_count(p) > line_count(logs[label]):
            logs[label] = p
    return sorted(logs.items())


# the fields of a trimmed line an edit reproduces exactly when its run is made again (timings do not)
DETERMINISTIC = ["index", "case_id", "attempts", "target_wins", "margin", "update_norm", "steps",
                 "first_update_wins", "gains"]


def trim(e):
    t = {k: e[k] for k in TRIMMED if k in e}
    t["first_update_wins"] = first_wins(e)
    if e.get("landing"):
        # each attempt's scale of the rule's step (1 for the first update)
        t["gains"] = [round(a["gain"], 4) for a in e["landing"]]
    return t


def same_edit(a, b):
    return all(a.get(k) == b.get(k) for k in DETERMINISTIC)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def export_landing(d):
    """Write landing-logs/LABEL.jsonl from each live run's log. Where the live run reproduces the
    committed lines on every deterministic field (a run remade from edit 1), the committed lines
    are kept as they are, so only the new edits change and their first timings survive; where
    it does not, the committed log is replaced from the first differing edit on."""
    os.makedirs(os.path.join(d, "landing-logs"), exist_ok=True)
    for label, path in sorted(live_run_logs(d).items()):
        trimmed = os.path.join(d, "landing-logs", label + ".jsonl")
        kept = read_jsonl(trimmed) if os.path.exists(trimmed) else []
        live = [trim(e) for e in read_jsonl(path)]
        if len(kept) > len(live):
            # a run restarted from scratch (its directory lost) must not shorten the committed log
            print(f"{trimmed}: kept ({len(kept)} edits; {path} has {len(live)})", file=sys.stderr)
            continue
        prefix = 0
        while prefix < len(kept) and same_edit(kept[prefix], live[prefix]):
            prefix += 1
        if prefix < len(kept):
            print(f"{trimmed}: edit {prefix + 1} differs from the live run; replaced from there",
                  file=sys.stderr)
        tmp = trimmed + ".tmp"
        with open(tmp, "w") as out:
            for t in kept[:prefix] + live[prefix:]:
                out.write(json.dumps(t) + "\n")
        os.replace(tmp, trimmed)


def landing_table(d):
    runs = run_logs(d)
    if not runs:
        return
    print()
    print("| run | edits | target wins right after its edit | after its first update | edits with > 1 "
          "attempt | median margin | median ‖ΔW‖ | median s per edit |")
    print("|---|---|---|---|---|---|---|---|")
    for label, path in runs:
        log = [json.loads(l) for l in open(path) if l.strip()]
        if not log:
            continue
        n = len(log)
        wins = sum(e["target_wins"] for e in log)
        first = sum(first_wins(e) for e in log)
        more = sum(e.get("attempts", 1) > 1 for e in log)
        margins = [e["margin"] for e in log if e.get("margin") is not None]
        print(f"| {label} | {n} | {wins} ({100 * wins / n:.1f}%) | {first} ({100 * first / n:.1f}%) | {more} "
              f"| {st.median(margins):.2f} | {st.median(e['update_norm'] for e in log):.2f} "
              f"| {st.median(e['seconds'] for e in log):.1f} |")


def oldest_table(d):
    paths = sorted(glob.glob(os.path.join(d, "oldest", "*-first100.json")))
    if not paths:
        return
    print()
    print("| method | after N edits | oldest 100 edits: efficacy / generalization / neighbourhood / agreement "
          "| gen efficacy / gen generalization / gen locality |")
    print("|---|---|---|---|")
    for p in paths:
        m = re.fullmatch(r"(.+)-(\d+)-first100\.json", os.path.basename(p))
        e = means(p)
        print(f"| {m.group(1)} | {m.group(2)} | {fmt(e, TF[:4])} | {fmt(e, GEN)} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--export-landing"]:
        for d in sys.argv[2:]:
            export_landing(d)
        sys.exit(0)
    for d in sys.argv[1:]:
        print(f"### {d}\n")
        main_table(d)
        landing_table(d)
        oldest_table(d)
        print()

#!/usr/bin/env python3
"""Writes bench-results/README.md from the reports (tables) and bench_readme_template.md (prose).
Run from the repository root after scripts/bench_sweep.py --plot-only has refreshed the tables."""
import json, math, os
B = "bench-results"
def row(path, keys=("efficacy", "generalization", "locality", "locality_agreement", "fluency"), side="edited"):
    d = json.load(open(path))["metrics"][side]
    return " / ".join(f"{d[k]['mean']:.2f}" for k in keys if k in d)
cf_table = open(f"{B}/counterfact/table.md").read()
zs_table = open(f"{B}/zsre/table.md").read() if os.path.exists(f"{B}/zsre/table.md") else "(not run)\n"
oldest = []
for m in ["rome", "memit", "alphaedit-single", "oedit", "oedit-plus-legacy", "oedit-plus", "oedit-soft"]:
    p = f"{B}/counterfact/oldest/{m}-1000-first100.json"
    if os.path.exists(p):
        at100 = row(f"{B}/counterfact/{m}-100.json", ("efficacy", "generalization", "locality", "locality_agreement"))
        keys = ("efficacy", "generalization", "locality", "locality_agreement")
        p2 = f"{B}/counterfact/oldest/{m}-2000-first100.json"
        at2000 = row(p2, keys) if os.path.exists(p2) else "–"
        oldest.append(f"| {m} | {at100} | {row(p, keys)} | {at2000} |")


def log_rows(method):
    path = f"{B}/counterfact/runs/{method}/log.jsonl"
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else None


def norm_table():
    """Update norms and `retained` per range of edits, from the run logs. The run directories are
    not committed, so the table is kept in analysis/update-norms.md and refreshed when they exist."""
    import statistics as st
    saved = f"{B}/analysis/update-norms.md"
    logs = {m: log_rows(m) for m in ["oedit", "oedit-plus-legacy", "rome", "alphaedit-single", "oedit-soft"]}
    if any(v is None or len(v) < 1000 for v in logs.values()):
        return open(saved).read().rstrip("\n")
    lines = []
    for a, b in [(0, 100), (100, 300), (300, 500), (500, 1000)]:
        def cell(m, what):
            xs = [e[what] for e in logs[m][a:b]]
            return st.median(xs), (min(xs) if what == "retained" else max(xs))
        cols = []
        for m in ["oedit", "oedit-plus-legacy"]:
            r, n = cell(m, "retained"), cell(m, "update_norm")
            cols += [f"{r[0]:.2f} / {r[1]:.2f}", f"{n[0]:.1f} / {n[1]:,.0f}"]
        n = cell("rome", "update_norm")
        cols.append(f"{n[0]:.1f} / {n[1]:,.0f}")
        for m in ["alphaedit-single", "oedit-soft"]:
            n, r = cell(m, "update_norm"), cell(m, "retained")
            cols.append(f"{n[0]:.1f} / {n[1]:,.0f} ({r[0]:.2f})")
        lines.append(f"| {a + 1}–{b} | " + " | ".join(cols) + " |")
    open(saved, "w").write("\n".join(lines) + "\n")
    return "\n".join(lines)


# Rows of the offline-replay table: (label, file under analysis/, rule name).
REPLAY_ROWS = [
    ("rome", "update-rules-rome1000.json", "rome"),
    ("alphaedit-single", "update-rules-rome1000.json", "alphaedit"),
    ("oedit (Euclidean), no floor", "update-rules-rome1000.json", "oedit"),
    ("oedit-plus, no floor", "update-rules-rome1000.json", "oedit-plus"),
    ("oedit (Euclidean), floor 0.1", "update-rules-floors-rome1000.json", "oedit-floor0.1"),
    ("oedit-plus, floor 0.1 (presets)", "update-rules-floors-rome1000.json", "oedit-plus-floor0.1"),
    ("oedit-plus, floor 0.2", "update-rules-floors-rome1000.json", "oedit-plus-floor0.2"),
    ("O-Edit inside AlphaEdit's null space, floor 0.1", "update-rules-variants-rome1000.json", "oedit-null-floor0.1"),
    ("O-Edit inside AlphaEdit's null space, floor 0.3", "update-rules-variants-rome1000.json", "oedit-null-floor0.3"),
    ("oedit-plus landing part of each edit (ridge γ = 0.03)", "update-rules-variants-rome1000.json", "oedit-plus-ridge0.03"),
    ("oedit-plus, ridge γ = 0.1", "update-rules-variants-rome1000.json", "oedit-plus-ridge0.1"),
    ("oedit-plus, ridge γ = 0.3", "update-rules-variants-rome1000.json", "oedit-plus-ridge0.3"),
    ("oedit-soft, λ = 100", "update-rules-soft-rome1000.json", "soft100"),
    ("oedit-soft, λ = 300", "update-rules-soft-rome1000.json", "soft300"),
    ("oedit-soft, λ = 1,000", "update-rules-soft-rome1000.json", "soft1000"),
    ("oedit-soft, λ = 3,000 (default)", "update-rules-soft-rome1000.json", "soft3000"),
    ("oedit-soft, λ = 10,000", "update-rules-soft-rome1000.json", "soft10000"),
]


def replay_table():
    """The replay rows at N = 500 and 1,000: kept, kept by the oldest 10%, disturbance."""
    def num(x, digits):
        return "diverges" if x is None or x != x else f"{x:.{digits}f}"
    lines = []
    for label, f, rule in REPLAY_ROWS:
        points = {p["n"]: p for p in json.load(open(f"{B}/analysis/{f}"))["rules"][rule]}
        p5, p10 = points[500], points[1000]
        if p10["disturb"] > 1e6:  # numerically blown up: the kept shares are meaningless
            kept, kept_old = "diverges", "diverges"
            disturb = f"10^{int(math.log10(p10['disturb']))}"
        else:
            kept = num(p10["kept"], 2)
            kept_old, disturb = num(p10["kept_old"], 2), num(p10["disturb"], 1)
        lines.append(f"| {label} | {num(p5['kept'], 2)} | {kept} | {kept_old} | {num(p5['disturb'], 1)} | {disturb} |")
    return "\n".join(lines)

text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_readme_template.md")).read()
text = text.replace("{CF_TABLE}", cf_table).replace("{ZSRE_TABLE}", zs_table).replace("{OLDEST}", "\n".join(oldest))
text = text.replace("{REPLAY_TABLE}", replay_table())
norms = norm_table()
if norms is None:
    # Keep the rows already rendered (the run directories are not part of the repository).
    old = open(f"{B}/README.md").read().split("\n")
    norms = "\n".join(l for l in old if l.startswith("| ") and l.split("|")[1].strip()[:1].isdigit()
                      and "–" in l.split("|")[1])
text = text.replace("{NORM_TABLE}", norms)
open(f"{B}/README.md", "w").write(text)

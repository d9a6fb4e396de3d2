#!/usr/bin/env python3
"""Writes bench-results/README.md from the reports (tables) and bench_readme_template.md (prose).
Run from the repository root after scripts/bench_sweep.py --plot-only has refreshed the tables."""
import json, os
B = "bench-results"
def row(path, keys=("efficacy", "generalization", "locality", "locality_agreement", "fluency"), side="edited"):
    d = json.load(open(path))["metrics"][side]
    return " / ".join(f"{d[k]['mean']:.2f}" for k in keys if k in d)
cf_table = open(f"{B}/counterfact/table.md").read()
zs_table = open(f"{B}/zsre/table.md").read() if os.path.exists(f"{B}/zsre/table.md") else "(not run)\n"
oldest = []
for m in ["rome", "memit", "alphaedit", "oedit", "oedit-plus"]:
    p = f"{B}/counterfact/oldest/{m}-1000-first100.json"
    if os.path.exists(p):
        at100 = row(f"{B}/counterfact/{m}-100.json", ("efficacy", "generalization", "locality", "locality_agreement"))
        oldest.append(f"| {m} | {at100} | {row(p, ('efficacy', 'generalization', 'locality', 'locality_agreement'))} |")
text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_readme_template.md")).read()
text = text.replace("{CF_TABLE}", cf_table).replace("{ZSRE_TABLE}", zs_table).replace("{OLDEST}", "\n".join(oldest))
open(f"{B}/README.md", "w").write(text)

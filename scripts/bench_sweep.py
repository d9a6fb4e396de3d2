#!/usr/bin/env python3
"""Sequential-editing benchmark: for each method, one run of edits (case_id order) serves all
checkpoints N; after each checkpoint every record edited so far is evaluated (efficacy,
generalization, neighbourhood score, locality agreement, fluency). Writes one eval report per
(method, N), a table (JSON and Markdown) and an SVG plot of each metric vs N. Resumable: existing reports are
kept, runs continue from their checkpoints (run directories under OUT/runs), and each report
evaluates the run as it stood after its N-th edit (`oedit eval --at N`), so a run already past N
still gives the report for N. The unedited side of each report comes from oedit's cache after
the first method. An entry LABEL=METHOD of --methods runs METHOD under another name (its
run directory, reports and table rows use LABEL). A file OUT/hparams-LABEL.json, when present, is passed to `oedit edit
--hparams` for that method (otherwise the model's preset is used).

usage: scripts/bench_sweep.py [--methods rome,memit,alphaedit,oedit,oedit-plus]
                              [--checkpoints 100,500,1000] [--edits ../shared/data/counterfact.jsonl]
                              [--out bench-results/counterfact] [--model smollm2-135m] [--threads 2]
                              [--jobs 1]
Needs only the Python standard library and a release build (cargo build --release).
"""
import argparse
import json
import os
import subprocess
import sys
import time

METRICS = ["efficacy", "generalization", "locality", "locality_agreement", "fluency",
           "efficacy_token_acc", "generalization_token_acc",
           "gen_efficacy", "gen_generalization", "gen_locality"]
PLOTTED = ["efficacy", "generalization", "locality", "locality_agreement", "fluency"]


def run(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kw)


def committed_edits(run_dir):
    """Edits the run's log records (each line is written after its edit's checkpoint)."""
    try:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def table(out, methods, checkpoints):
    rows = []
    for m in methods:
        for n in checkpoints:
            path = os.path.join(out, f"{m}-{n}.json")
            if not os.path.exists(path):
                continue
            rep = json.load(open(path))
            for model in ("edited", "unedited"):
                summ = rep["metrics"][model] or {}
                row = {"method": m if model == "edited" else "unedited", "n": n,
                       "evaluated": rep["records"]["evaluated"]}
                for k in METRICS:
                    if k in summ:
                        row[k] = summ[k]["mean"]
                if model == "unedited":
                    row["of_run"] = m
                rows.append(row)
    return rows


def markdown(rows, path):
    """The table as Markdown: one row per (N, method), unedited first at each N."""
    cols = ["efficacy", "efficacy_token_acc", "generalization", "generalization_token_acc",
            "locality", "locality_agreement", "fluency"]
    names = ["efficacy", "efficacy token acc", "generalization", "generalization token acc",
             "neighbourhood score", "locality agreement", "fluency"]
    gen = ["gen_efficacy", "gen_generalization", "gen_locality"]
    if any(c in r for r in rows for c in gen):
        cols += gen
        names += ["gen efficacy", "gen generalization", "gen locality"]
    lines = ["| method | N | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(cols)]
    for n in sorted({r["n"] for r in rows}):
        at_n = [r for r in rows if r["n"] == n]
        unedited = [r for r in at_n if r["method"] == "unedited"][:1]
        for r in unedited + [r for r in at_n if r["method"] != "unedited"]:
            cells = [f"{r[c]:.3f}" if c in r else "–" for c in cols]
            lines.append(f"| {r['method']} | {n} | " + " | ".join(cells) + " |")
    open(path, "w").write("\n".join(lines) + "\n")


def svg(rows, path):
    """Small multiples: one panel per metric, one line per method (no dependencies)."""
    methods = sorted({r["method"] for r in rows if r["method"] != "unedited"})
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    ns = sorted({r["n"] for r in rows})
    if not ns:
        return
    w, h, pad = 300, 220, 40
    panels = [m for m in PLOTTED if any(m in r for r in rows)]
    xlabel = "sequential edits N (x axis); each point: all N edited records evaluated after the N-th edit" 
    width = w * len(panels)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + 50}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{h + 50}" fill="#fff"/>']
    xmin, xmax = min(ns), max(ns)
    for i, metric in enumerate(panels):
        vals = [r[metric] for r in rows if metric in r]
        lo, hi = (0.0, 1.0) if metric != "fluency" else (min(vals) * 0.95, max(vals) * 1.05)
        ox = i * w
        x = lambda n: ox + pad + (0 if xmax == xmin else (n - xmin) / (xmax - xmin)) * (w - 2 * pad)
        y = lambda v: h - pad + 20 - (v - lo) / ((hi - lo) or 1) * (h - 2 * pad)
        out.append(f'<text x="{ox + w / 2}" y="14" text-anchor="middle" font-weight="bold">{metric}</text>')
        out.append(f'<line x1="{ox + pad}" y1="{y(lo)}" x2="{ox + w - pad}" y2="{y(lo)}" stroke="#000"/>')
        out.append(f'<line x1="{ox + pad}" y1="{y(lo)}" x2="{ox + pad}" y2="{y(hi)}" stroke="#000"/>')
        for v in (lo, (lo + hi) / 2, hi):
            out.append(f'<text x="{ox + pad - 4}" y="{y(v) + 4}" text-anchor="end">{v:.2f}</text>')
        for n in ns:
            out.append(f'<text x="{x(n)}" y="{y(lo) + 14}" text-anchor="middle">{n}</text>')
        series = methods + ["unedited"]
        for j, m in enumerate(series):
            pts = sorted({(r["n"], r[metric]) for r in rows if r["method"] == m and metric in r})
            if m == "unedited":
                # one unedited value per N (identical across runs of the same records)
                seen = {}
                for n, v in pts:
                    seen.setdefault(n, v)
                pts = sorted(seen.items())
            colour = "#777" if m == "unedited" else colours[j % len(colours)]
            dash = ' stroke-dasharray="4 3"' if m == "unedited" else ""
            if len(pts) > 1:
                d = " ".join(f"{x(n):.1f},{y(v):.1f}" for n, v in pts)
                out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
            for n, v in pts:
                out.append(f'<circle cx="{x(n):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>')
            if i == 0:
                out.append(f'<text x="{pad + 110 * j}" y="{h + 42}" fill="{colour}" font-weight="bold">{m}</text>')
    out.append(f'<text x="{width / 2}" y="{h + 26}" text-anchor="middle" fill="#444">{xlabel.strip()}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="rome,memit,alphaedit,oedit,oedit-plus")
    ap.add_argument("--checkpoints", default="100,500,1000")
    ap.add_argument("--edits", default=os.path.join("..", "shared", "data", "counterfact.jsonl"))
    ap.add_argument("--out", default=os.path.join("bench-results", "counterfact"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--metrics", default="efficacy,generalization,locality,fluency")
    ap.add_argument("--oedit", default=os.path.join("target", "release", "oedit"))
    ap.add_argument("--jobs", type=int, default=1, help="methods run concurrently (use --threads 1 with --jobs 2 on 2 cores)")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--no-edit", action="store_true",
                    help="only evaluate checkpoints the runs already reached (e.g. while another process edits)")
    a = ap.parse_args()
    # (label, oedit method) per --methods entry: LABEL=METHOD, or METHOD under its own name.
    entries = [tuple(m.split("=", 1)) if "=" in m else (m, m) for m in a.methods.split(",") if m]
    checkpoints = sorted(int(n) for n in a.checkpoints.split(",") if n)
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    if not a.plot_only:
        def sweep(entry):
            m, method = entry
            run_dir = os.path.join(a.out, "runs", m)
            for n in checkpoints:
                report = os.path.join(a.out, f"{m}-{n}.json")
                if os.path.exists(report):
                    continue
                t = time.time()
                if a.no_edit:
                    if committed_edits(run_dir) < n:
                        print(f"{m}: run has not reached {n} edits; skipped", file=sys.stderr)
                        continue
                else:
                    # OUT/hparams-LABEL.json pins a run's hyper-parameters (runs started
                    # under older presets continue, and are reproduced, with their own).
                    pinned = os.path.join(a.out, f"hparams-{m}.json")
                    hp = ["--hparams", pinned] if os.path.exists(pinned) else []
                    run([a.oedit, "--threads", a.threads, "edit", "--model", a.model, "--edits", a.edits,
                         "--run", run_dir, "--method", method, "--limit", str(n), "--on-invalid", "skip",
                         *hp, "--json"], stdout=subprocess.DEVNULL)
                edit_s = time.time() - t
                run([a.oedit, "--threads", a.threads, "eval", "--model", a.model, "--run", run_dir,
                     "--at", str(n), "--edits", a.edits, "--metrics", a.metrics, "--json", report])
                rep = json.load(open(report))
                rep["sweep"] = {"method": m, "oedit_method": method, "n": n, "edit_seconds_this_step": edit_s, "commit": git_commit(),
                                "command": " ".join(sys.argv)}
                json.dump(rep, open(report, "w"), indent=1)

        if a.jobs > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(a.jobs) as ex:
                for f in [ex.submit(sweep, e) for e in entries]:
                    f.result()
        else:
            for e in entries:
                sweep(e)
    rows = table(a.out, [label for label, _ in entries], checkpoints)
    json.dump({"commit": git_commit(), "edits": a.edits, "model": a.model, "rows": rows},
              open(os.path.join(a.out, "table.json"), "w"), indent=1)
    svg(rows, os.path.join(a.out, "metrics-vs-n.svg"))
    markdown(rows, os.path.join(a.out, "table.md"))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Where locality goes in a long multi-layer run: how much of each edit reaches other keys.

Reads a run directory (its stored keys and applied factors r u^T, per layer and edit) and the
key statistics C = E[k k^T] the run used (the cache of `oedit`, ~/.cache/oedit/stats). Three
tables, per edited layer:

1. The null space of AlphaEdit's absolute threshold on this model: how many eigen-directions
   of C fall below it, the share of the corpus keys' energy they hold (tr(P C) / tr C), and the
   share of the edited (subject) keys' energy (|P k|^2 / |k|^2, mean over edits).
2. Leak per unit of landed change, by direction rule (no memory, no ridge: the direction u of
   one key k scaled so that u.k = 1): onto other subjects' keys, sqrt(median_i mean_j
   (u_i.k_j)^2) over edits i < 150 and j in 150..300 (keys of other subjects), and onto the
   corpus keys, sqrt(median_i u_i^T C u_i). ROME's C^-1 k minimises the corpus term by
   construction; restricting u to a null space can only raise it.
3. The run's accumulated change dW_N = sum of the factors of its first N edits at that layer:
   its RMS effect on the corpus keys sqrt(tr(dW_N C dW_N^T)) and its median effect |dW_N k| on
   the keys of the next 100 records' subjects (not yet edited when N edits were done), both in
   units of the median |r| of one edit at that layer (its change at its own key), and the
   growth exponent between checkpoints (0.5: the leaks add like a random walk; 1: they add up
   coherently).

usage: key_leak.py RUN_DIR [--stats-dir DIR] [--checkpoints 100,250,500,1000] [--json OUT]
Needs numpy and safetensors (`pip install numpy safetensors`). OPENBLAS_NUM_THREADS=1 while
other jobs use the cores.
"""
import argparse
import glob
import json
import os

import numpy as np
from safetensors.numpy import load_file


def load_rows(run_dir):
    """Every applied factor in order: (edit index, layer, key, r, u). The journal keeps them in
    chunks of 256 edits (chunk-*) and the newest edits one per file (edit-*), which sort after."""
    rows = []
    edit = 0
    for path in sorted(glob.glob(os.path.join(run_dir, "updates", "*.safetensors"))):
        d = load_file(path)
        per_edit = d["n_updates"]
        at = 0
        for n in per_edit:
            for j in range(at, at + int(n)):
                rows.append((edit, int(d["layer"][j]), d["key"][j].astype(np.float64),
                             d["r"][j].astype(np.float64), d["u"][j].astype(np.float64)))
            at += int(n)
            edit += 1
    return rows


def stats_path(stats_dir, manifest, layer):
    fp = manifest["model"]["fingerprint"]
    tokens = manifest["hparams"]["cov_tokens"]
    found = glob.glob(os.path.join(stats_dir, f"{fp}-layer{layer}-{tokens}tok-corpus*.safetensors"))
    if len(found) != 1:
        raise SystemExit(f"error: {len(found)} statistics files for layer {layer} in {stats_dir} "
                         f"(model {fp}, {tokens} tokens): expected one")
    return found[0]


def first_keys(rows, layer):
    """The key of each edit's first update at `layer`, by edit index."""
    out = {}
    for edit, lay, k, _, _ in rows:
        if lay == layer and edit not in out:
            out[edit] = k
    return out


def leak(u, own, others, c):
    scale = np.einsum("ij,ij->i", u, own)
    u = u / scale[:, None]
    nb = np.sqrt(np.median(((u @ others.T) ** 2).mean(1)))
    corpus = np.sqrt(np.median(np.einsum("ij,jk,ik->i", u, c, u)))
    return float(nb), float(corpus)


def write_json(path, data):
    """The report as indented JSON with a final newline."""
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--stats-dir", default=os.path.join(
        os.environ.get("OEDIT_CACHE", os.path.expanduser("~/.cache/oedit")), "stats"))
    ap.add_argument("--checkpoints", default="100,250,500,1000")
    ap.add_argument("--thresholds", default="1e-2,5e-3,3e-3")
    ap.add_argument("--json")
    a = ap.parse_args()
    manifest = json.load(open(os.path.join(a.run, "manifest.json")))
    rows = load_rows(a.run)
    n_edits = 1 + max(r[0] for r in rows)
    layers = sorted({r[1] for r in rows})
    checkpoints = [n for n in map(int, a.checkpoints.split(",")) if n + 100 <= n_edits]
    thresholds = [float(t) for t in a.thresholds.split(",")]
    out = {"run": a.run, "method": manifest["method"], "edits": n_edits, "layers": {}}
    for layer in layers:
        c = load_file(stats_path(a.stats_dir, manifest, layer))["second_moment"].astype(np.float64)
        vals, vecs = np.linalg.eigh(c)
        f = len(vals)
        keys = first_keys(rows, layer)
        k_all = np.array([keys[i] for i in sorted(keys)])
        rep = {"null_space": [], "leak": [], "accumulated": []}
        proj = (k_all @ vecs) ** 2
        for t in thresholds:
            below = vals < t
            rep["null_space"].append({
                "threshold": t, "dim": int(below.sum()), "of": f,
                "corpus_energy": float(vals[below].sum() / vals.sum()),
                "edited_key_energy": float((proj[:, below].sum(1) / proj.sum(1)).mean())})
        own, others = k_all[:150], k_all[150:300]
        reg = c + 1e-2 * np.trace(c) / f * np.eye(f)
        rules = [("rome (C^-1 k)", np.linalg.solve(reg, own.T).T)]
        for t in thresholds:
            p = vecs[:, vals < t]
            rules.append((f"null space < {t:g}", (p @ (p.T @ own.T)).T))
        for name, u in rules:
            nb, corpus = leak(u, own, others, c)
            rep["leak"].append({"rule": name, "other_subjects": nb, "corpus": corpus})
        r_norms = [np.linalg.norm(r) for e, lay, _, r, _ in rows if lay == layer]
        unit = float(np.median(r_norms))
        dw = np.zeros((len(rows[0][3]), f))
        at = 0
        prev = None
        for n in checkpoints:
            while at < len(rows) and rows[at][0] < n:
                _, lay, _, r, u = rows[at]
                if lay == layer:
                    dw += np.outer(r, u)
                at += 1
            nxt = np.array([keys[i] for i in range(n, n + 100) if i in keys])
            unseen = float(np.median(np.linalg.norm(nxt @ dw.T, axis=1))) / unit
            corpus = float(np.sqrt(np.trace(dw @ c @ dw.T))) / unit
            row = {"n": n, "unseen_subjects": unseen, "corpus": corpus}
            if prev:
                row["exponent_unseen"] = float(np.log(unseen / prev["unseen_subjects"]) / np.log(n / prev["n"]))
                row["exponent_corpus"] = float(np.log(corpus / prev["corpus"]) / np.log(n / prev["n"]))
            rep["accumulated"].append(row)
            prev = row
        rep["median_r"] = unit
        out["layers"][layer] = rep
        print(f"layer {layer} (median |r| of one edit {unit:.2f})")
        for s in rep["null_space"]:
            print(f"  null space < {s['threshold']:g}: {s['dim']} of {f} directions, corpus energy "
                  f"{s['corpus_energy']:.3f}, edited keys' energy {s['edited_key_energy']:.3f}")
        for s in rep["leak"]:
            print(f"  leak per unit landed, {s['rule']}: other subjects {s['other_subjects']:.4f}, "
                  f"corpus {s['corpus']:.4f}")
        for s in rep["accumulated"]:
            ex = (f" (growth exponent {s['exponent_unseen']:.2f} / {s['exponent_corpus']:.2f})"
                  if "exponent_unseen" in s else "")
            print(f"  after {s['n']} edits: on unseen subjects' keys {s['unseen_subjects']:.2f}, "
                  f"on corpus keys {s['corpus']:.3f}{ex}")
    if a.json:
        write_json(a.json, out)


if __name__ == "__main__":
    main()

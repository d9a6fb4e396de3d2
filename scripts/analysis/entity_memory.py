#!/usr/bin/env python3
"""Would protecting *subject* keys, not only the corpus keys, cut AlphaEdit's leak onto subjects
that were never edited? An offline replay of a stored `alphaedit` run at one layer.

AlphaEdit's direction for key k is x = U^T (A + (Uk)(Uk)^T)^-1 Uk, with U the null-space basis of
the corpus key statistics and A = alpha*I + sum over earlier edits of (Uk_p)(Uk_p)^T. The variant
adds gamma * sum_e (Uk_e)(Uk_e)^T to A for a set of held-out subject keys k_e (an "entity
memory"), which penalises x . k_e for subjects in general, not only for those already edited.

The replay takes the run's stored key of each edit at LAYER (its first update there) and the
change that edit landed at its own key, r (u . k) summed over its attempts; for every rule it
recomputes the directions of edits 0 .. N-1 in order and scales each edit's factor so that it
lands the same change at its own key. It reports, in units of the median landed change of one
edit: the accumulated change on the keys of the next 100 subjects (edits N .. N+99: never edited
at N), its RMS effect on the corpus keys sqrt(tr(dW C dW^T)), and how far the first 100 edits'
keys have drifted from their own landed change. The entity keys are the run's edits N+100 ..
end: subjects of the same distribution as the unseen ones, the best case for the variant.
The first row replays the run's stored directions, the second recomputes AlphaEdit's (they
should agree: a check of the replay). Before the rules, how much shape the subject keys share, in
null-space coordinates (where every direction lives): the share of the unseen subjects' key
energy in the top r principal directions of the entity keys (r/n0 for isotropic keys), and the
median |cos| between an early edit's key and an unseen subject's (1/sqrt(n0) for random ones).

usage: entity_memory.py RUN_DIR [--layer 5] [--n 500] [--gammas 1,3,10,30,100] [--json OUT]
Needs numpy and safetensors. OPENBLAS_NUM_THREADS=1 while other jobs use the cores.
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import load_file

from key_leak import load_rows, stats_path, write_json


def per_edit(rows, layer):
    """(keys, landed change at own key, stored direction) per edit at `layer`, in edit order."""
    keys, landed, dirs = {}, {}, {}
    for edit, lay, k, r, u in rows:
        if lay != layer:
            continue
        if edit not in keys:
            keys[edit], dirs[edit], landed[edit] = k, u, np.zeros_like(r)
        landed[edit] += r * (u @ keys[edit])
    ids = sorted(keys)
    return (np.array([keys[i] for i in ids]), np.array([landed[i] for i in ids]),
            np.array([dirs[i] for i in ids]))


def alphaedit_directions(null_basis, alpha, keys, n, entity_keys=None, gamma=0.0):
    """AlphaEdit's directions for the first n keys in order, optionally with an entity memory."""
    a = alpha * np.eye(null_basis.shape[0])
    if entity_keys is not None and gamma > 0:
        y = entity_keys @ null_basis.T
        a += gamma * y.T @ y
    out = []
    for k in keys[:n]:
        y = null_basis @ k
        out.append(null_basis.T @ np.linalg.solve(a + np.outer(y, y), y))
        a += np.outer(y, y)
    return np.array(out)


def shared_shape(null_basis, keys, n, entity):
    """Share of the unseen keys' energy in the entity keys' top principal directions, and the
    median |cos| between edited and unseen subjects' keys, in null-space coordinates."""
    unseen = keys[n:n + 100] @ null_basis.T
    _, _, vt = np.linalg.svd(entity @ null_basis.T, full_matrices=False)
    total = (unseen ** 2).sum()
    ranks = [r for r in (1, 10, 100, len(entity)) if r <= len(vt)]
    captured = {r: float(((unseen @ vt[:r].T) ** 2).sum() / total) for r in ranks}
    edited = keys[:n] @ null_basis.T
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)
    cos = float(np.median(np.abs(unit(edited) @ unit(unseen).T)))
    return captured, cos


def measure(directions, keys, landed, n, c, unit):
    dw = np.zeros((landed.shape[1], keys.shape[1]))
    norms = []
    for i in range(n):
        r = landed[i] / (directions[i] @ keys[i])
        dw += np.outer(r, directions[i])
        norms.append(np.linalg.norm(r) * np.linalg.norm(directions[i]))
    unseen = keys[n:n + 100]
    return {
        "unseen_subjects": float(np.median(np.linalg.norm(unseen @ dw.T, axis=1)) / unit),
        "corpus": float(np.sqrt(np.trace(dw @ c @ dw.T)) / unit),
        "oldest_100_drift": float(np.median(np.linalg.norm(keys[:100] @ dw.T - landed[:100], axis=1)) / unit),
        "median_update_norm": float(np.median(norms)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--stats-dir", default=os.path.join(
        os.environ.get("OEDIT_CACHE", os.path.expanduser("~/.cache/oedit")), "stats"))
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--gammas", default="1,3,10,30,100")
    ap.add_argument("--json")
    a = ap.parse_args()
    manifest = json.load(open(os.path.join(a.run, "manifest.json")))
    if manifest["method"] != "alphaedit":
        raise SystemExit(f"error: {a.run} is a `{manifest['method']}` run; the replay is AlphaEdit's")
    p = manifest["hparams"].get("alphaedit") or {}
    threshold, alpha = p.get("nullspace_threshold", 1e-2), p.get("l2", 10.0)
    keys, landed, stored = per_edit(load_rows(a.run), a.layer)
    if len(keys) < a.n + 200:
        raise SystemExit(f"error: layer {a.layer} of {a.run} has {len(keys)} edits; --n {a.n} needs "
                         f"at least {a.n + 200} (100 unseen subjects and some entity keys after it)")
    c = load_file(stats_path(a.stats_dir, manifest, a.layer))["second_moment"].astype(np.float64)
    vals, vecs = np.linalg.eigh(c)
    null_basis = vecs[:, vals < threshold].T
    entity = keys[a.n + 100:]
    unit = float(np.median(np.linalg.norm(landed[:a.n], axis=1)))
    rules = [("stored directions (the run)", stored[:a.n]),
             ("alphaedit, recomputed", alphaedit_directions(null_basis, alpha, keys, a.n))]
    for g in map(float, a.gammas.split(",")):
        rules.append((f"+ entity memory, gamma {g:g}",
                      alphaedit_directions(null_basis, alpha, keys, a.n, entity, g)))
    n0 = null_basis.shape[0]
    out = {"run": a.run, "layer": a.layer, "n": a.n, "entity_keys": len(entity),
           "null_dim": n0, "median_landed": unit, "rules": []}
    captured, cos = shared_shape(null_basis, keys, a.n, entity)
    out["unseen_energy_in_entity_pcs"] = {str(r): v for r, v in captured.items()}
    out["median_abs_cos"] = cos
    print(f"{a.run}, layer {a.layer}, after {a.n} edits ({len(entity)} entity keys, null space "
          f"{n0} of {len(vals)}; unit: median landed change {unit:.2f})")
    print("  unseen subjects' key energy in the entity keys' top r directions: " + ", ".join(
        f"r={r} {v:.3f} (isotropic {r / n0:.3f})" for r, v in captured.items()))
    print(f"  median |cos| edited / unseen subject keys {cos:.3f} (random {1 / np.sqrt(n0):.3f})")
    for name, d in rules:
        row = {"rule": name, **measure(d, keys, landed, a.n, c, unit)}
        out["rules"].append(row)
        print(f"  {name:32s} unseen subjects {row['unseen_subjects']:.3f}  corpus {row['corpus']:.4f}"
              f"  oldest-100 drift {row['oldest_100_drift']:.3f}  median |dW_i| {row['median_update_norm']:.2f}")
    if a.json:
        write_json(a.json, out)


if __name__ == "__main__":
    main()

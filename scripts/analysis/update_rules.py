#!/usr/bin/env python3
"""Offline comparison of sequential update rules on the keys and targets of a real run.

A run directory stores, for every edit i, its key k_i and the factors (r_i, u_i) that were
applied. From a ROME run (rank-one, no projection) the total change each edit asked for at its
own key is recovered exactly: t_i = r_i + sum_{j<i} r_j u_j^T k_i (what v*_i - W0 k_i was).
Each rule below is then replayed on the same sequence of (k_i, t_i) with closed-form updates
only (no v* optimisation: the targets are held fixed, as in MEMIT's batch setting), and after
each checkpoint N it reports

  kept      mean over edits i <= N of 1 - |t_i - dW k_i| / |t_i|  (1: the edit is fully there)
  kept_old  the same over the first 10% of the edits
  disturb   sqrt(tr(dW C dW^T)): RMS change of the layer's output over the corpus keys
            (C = E[k k^T], the statistics the run used); what locality pays
  norm      |dW|_F

Rules: rome (u = C^-1 k / k^T C^-1 k), oedit (Euclidean projection against earlier keys),
oedit-plus (the same projection in whitened space), alphaedit (null-space projection of C with
the ridge alpha and the memory of past keys, as oedit implements it), and variants with a
conflict floor (-floorF), O-Edit inside AlphaEdit's null space (oedit-null-floorF) and
oedit-plus landing only part of each edit (oedit-plus-ridgeG).

usage: update_rules.py RUN_DIR STATS.safetensors [--checkpoints 100,300,500,1000] [--json OUT]
Needs numpy and safetensors (the venv of scripts/pytorch_reference/setup.sh has both). Set
OPENBLAS_NUM_THREADS=1 while other jobs use the cores: threaded BLAS under contention is ~10x slower.
"""
import argparse
import glob
import json
import os

import numpy as np
from safetensors.numpy import load_file


def load_run(run_dir):
    keys, rs, us = [], [], []
    for path in sorted(glob.glob(os.path.join(run_dir, "updates", "*.safetensors"))):
        d = load_file(path)
        keys.append(d["key"].astype(np.float64))
        rs.append(d["r"].astype(np.float64))
        us.append(d["u"].astype(np.float64))
    n = sum(1 for _ in open(os.path.join(run_dir, "log.jsonl")))
    k, r, u = (np.concatenate(x)[:n] for x in (keys, rs, us))
    return k, r, u


def targets(k, r, u):
    """t_i = r_i + (sum_{j<i} r_j u_j^T) k_i for a run that applied r_j u_j^T unprojected."""
    dw = np.zeros((r.shape[1], k.shape[1]))
    t = np.empty_like(r)
    for i in range(len(k)):
        t[i] = r[i] + dw @ k[i]
        dw += np.outer(r[i], u[i])
    return t


class Rome:
    def __init__(self, c_reg, c_raw):
        self.cinv = np.linalg.inv(c_reg)

    def direction(self, k):
        z = self.cinv @ k
        return z / (k @ z)

    def after(self, k):
        pass


class Oedit(Rome):
    """Euclidean projection against the earlier keys (orthonormal basis, Gram-Schmidt twice)."""

    def __init__(self, c_reg, c_raw):
        super().__init__(c_reg, c_raw)
        self.basis = np.zeros((0, c_reg.shape[0]))

    def project(self, x):
        for _ in range(2):
            x = x - self.basis.T @ (self.basis @ x)
        return x

    def direction(self, k):
        pz = self.project(self.cinv @ k)
        return pz / (k @ pz)

    def after(self, k):
        v = self.project(k)
        if np.linalg.norm(v) > 0.01 * np.linalg.norm(k):
            self.basis = np.vstack([self.basis, v / np.linalg.norm(v)])


def release(basis, gain, full, floor):
    """Drops the rows whose removal gives back the most (gain / full each), largest first, until
    the retained share 1 - sum(gain) / full reaches `floor`."""
    ret = (full - gain.sum()) / full
    drop = []
    for i in np.argsort(-gain):
        if ret >= floor:
            break
        ret += gain[i] / full
        drop.append(i)
    return np.delete(basis, drop, axis=0) if drop else basis


class OeditFloor(Oedit):
    """oedit with a floor on `retained`: the stored directions that conflict most with the new
    key are released until at least `floor` of k*'s C^-1 energy survives the projection."""

    floor = 0.1

    def direction(self, k):
        z = self.cinv @ k
        full = k @ z
        if len(self.basis):
            gain = (self.basis @ k) * (self.basis @ z)  # what removing each row gives back
            self.basis = release(self.basis, gain, full, self.floor)
        return super().direction(k)


class OeditPlus(Oedit):
    """The projection in whitened coordinates w = L^-1 k (C = L L^T)."""

    def __init__(self, c_reg, c_raw):
        super().__init__(c_reg, c_raw)
        self.l = np.linalg.cholesky(c_reg)
        self.linv = np.linalg.inv(self.l)

    def direction(self, k):
        pw = self.project(self.linv @ k)
        return self.linv.T @ pw / (pw @ pw)

    def after(self, k):
        super().after(self.linv @ k)


class AlphaEdit:
    """x = (P0 M P0 + alpha I)^-1 P0 k in null-space coordinates, M = k k^T + sum past k k^T."""

    def __init__(self, c_reg, c_raw, threshold=1e-2, alpha=10.0):
        vals, vecs = np.linalg.eigh(c_raw)
        self.u = vecs[:, vals < threshold].T
        self.alpha = alpha
        self.past = np.zeros((len(self.u), len(self.u)))

    def direction(self, k):
        uk = self.u @ k
        sys = self.past + np.outer(uk, uk) + self.alpha * np.eye(len(uk))
        return self.u.T @ np.linalg.solve(sys, uk)

    def after(self, k):
        uk = self.u @ k
        self.past += np.outer(uk, uk)


class OeditPlusFloor(OeditPlus):
    """oedit-plus with the same floor, in whitened coordinates (gain = squared coefficient)."""

    floor = 0.1

    def direction(self, k):
        w = self.linv @ k
        if len(self.basis):
            gain = (self.basis @ w) ** 2
            full = w @ w
            self.basis = release(self.basis, gain, full, self.floor)
        return super().direction(k)


class OeditPlusRidge(OeditPlusFloor):
    """oedit-plus (floor 0.1) landing only part of each edit: u = L^-T P w / (|P w|^2 + g |w|^2),
    i.e. the share |Pw|^2 / (|Pw|^2 + g |w|^2) of the requested change (norm control)."""

    gamma = 0.1

    def direction(self, k):
        u = super().direction(k)  # L^-T P w / |P w|^2, after the floor's releases
        w = self.linv @ k
        pw2 = 1.0 / (u @ self.l @ self.l.T @ u)  # |P w|^2, since u^T C u = 1 / |P w|^2
        return u * pw2 / (pw2 + self.gamma * (w @ w))


class OeditNull(Oedit):
    """oedit inside AlphaEdit's null space: keys are taken in null-space coordinates y = U k
    (U: eigenvectors of C below the threshold), projected against the earlier edits' y and
    landed exactly, u = U^T p / (p . p); with the same floor on the retained share."""

    floor = 0.1

    def __init__(self, c_reg, c_raw, threshold=1e-2):
        vals, vecs = np.linalg.eigh(c_raw)
        self.u = vecs[:, vals < threshold].T
        self.basis = np.zeros((0, len(self.u)))

    def direction(self, k):
        y = self.u @ k
        if len(self.basis):
            self.basis = release(self.basis, (self.basis @ y) ** 2, y @ y, self.floor)
        p = self.project(y)
        return self.u.T @ p / (p @ p)

    def after(self, k):
        super().after(self.u @ k)


class SoftOrthogonal(Rome):
    """Soft O-Edit in C's metric: the update minimises lam * tr(D C D^T) (disturbance of the
    corpus keys) + sum over earlier keys |D k_p|^2 (their outputs) + |D k - r|^2 (landing), so
    D = r k^T (lam C + K_p K_p^T + k k^T)^-1. As lam -> 0 this is oedit-plus without a floor
    (exact landing, earlier keys exactly kept); lam > 0 shrinks each direction of the stored
    subspace by its stored energy instead of cutting it out. A^-1 = (lam C + K_p K_p^T)^-1 is
    kept by Sherman-Morrison."""

    lam = 30.0

    def __init__(self, c_reg, c_raw):
        self.ainv = np.linalg.inv(self.lam * c_reg)

    def direction(self, k):
        z = self.ainv @ k
        return z / (1.0 + k @ z)

    def after(self, k):
        z = self.ainv @ k
        self.ainv -= np.outer(z, z) / (1.0 + k @ z)


def with_floor(cls, floor):
    return type(f"{cls.__name__}{floor}", (cls,), {"floor": floor})


RULES = {"rome": Rome, "oedit": Oedit, "oedit-plus": OeditPlus, "alphaedit": AlphaEdit}
for _f in (0.05, 0.1, 0.2, 0.3):
    RULES[f"oedit-floor{_f}"] = with_floor(OeditFloor, _f)
    RULES[f"oedit-plus-floor{_f}"] = with_floor(OeditPlusFloor, _f)
    RULES[f"oedit-null-floor{_f}"] = with_floor(OeditNull, _f)
for _g in (0.03, 0.1, 0.3):
    RULES[f"oedit-plus-ridge{_g}"] = type(f"OeditPlusRidge{_g}", (OeditPlusRidge,), {"gamma": _g})
for _l in (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0):
    RULES[f"soft{_l:g}"] = type(f"SoftOrthogonal{_l:g}", (SoftOrthogonal,), {"lam": _l})


def replay(rule, k, t, c_raw, checkpoints):
    dw = np.zeros((t.shape[1], k.shape[1]))
    rows = []
    for i in range(len(k)):
        r = t[i] - dw @ k[i]
        u = rule.direction(k[i])
        dw += np.outer(r, u)
        rule.after(k[i])
        n = i + 1
        if n in checkpoints:
            miss = np.linalg.norm(t[:n] - k[:n] @ dw.T, axis=1) / np.linalg.norm(t[:n], axis=1)
            kept = 1.0 - miss
            old = max(1, n // 10)
            rows.append({"n": n, "kept": float(kept.mean()), "kept_old": float(kept[:old].mean()),
                         "disturb": float(np.sqrt(np.trace(dw @ c_raw @ dw.T))),
                         "norm": float(np.linalg.norm(dw))})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("stats")
    ap.add_argument("--checkpoints", default="100,300,500,1000")
    ap.add_argument("--regularization", type=float, default=0.01, help="cov_regularization of the run")
    ap.add_argument("--rules", default="rome,oedit,oedit-plus,alphaedit")
    ap.add_argument("--json")
    a = ap.parse_args()
    k, r, u = load_run(a.run)
    c_raw = load_file(a.stats)["second_moment"]
    c_reg = c_raw + a.regularization * np.mean(np.diag(c_raw)) * np.eye(len(c_raw))
    t = targets(k, r, u)
    checkpoints = {n for n in map(int, a.checkpoints.split(",")) if n <= len(k)} | {len(k)}
    out = {"run": a.run, "edits": len(k), "rules": {}}
    for name in a.rules.split(","):
        out["rules"][name] = replay(RULES[name](c_reg, c_raw), k, t, c_raw, checkpoints)
    print(f"{'rule':<11} {'N':>5} {'kept':>6} {'kept_old':>8} {'disturb':>8} {'norm':>7}")
    for name, rows in out["rules"].items():
        for row in rows:
            print(f"{name:<11} {row['n']:>5} {row['kept']:>6.3f} {row['kept_old']:>8.3f} "
                  f"{row['disturb']:>8.2f} {row['norm']:>7.1f}")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

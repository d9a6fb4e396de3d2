#!/usr/bin/env python3
"""Side-by-side summary of an `oedit edit --method rome` run and the PyTorch reference (rome_edit.py).

    summarize.py OEDIT_RUN_DIR REFERENCE_JSONL [--factors REF_FACTORS.safetensors]

Prints a table per edit (steps, loss_first, loss_last, p_target_after, target wins, seconds for
both), the agreement of the rank-one factors (r, u, k*) when --factors is given, and the medians
with the ratio PyTorch / oedit. Exit status 1 when the two disagree on an outcome (target wins)
or the factors differ by more than --max-rel-err.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("reference")
    ap.add_argument("--factors")
    ap.add_argument("--max-rel-err", type=float, default=1e-3)
    args = ap.parse_args()

    oedit = [json.loads(l) for l in (Path(args.run) / "log.jsonl").read_text().splitlines() if l.strip()]
    ref_lines = [json.loads(l) for l in Path(args.reference).read_text().splitlines() if l.strip()]
    ref = [r for r in ref_lines if "index" in r]
    n = min(len(oedit), len(ref))
    if n == 0:
        sys.exit("no edits to compare")
    ok = True
    print(f"{'#':>2} {'subject':<24} {'steps':>9} {'loss_first':>19} {'loss_last':>17} "
          f"{'p_target_after':>15} {'wins':>9} {'seconds':>15}")
    print(f"{'':>2} {'':<24} {'oe/pt':>9} {'oedit / pytorch':>19} {'oedit / pytorch':>17} "
          f"{'oe / pt':>15} {'oe/pt':>9} {'oedit / pytorch':>15}")
    for o, r in zip(oedit[:n], ref[:n]):
        same = o["target_wins"] == r["target_wins"]
        ok &= same
        print(f"{o['index']:>2} {o['subject'][:24]:<24} {o['steps']:>4}/{r['steps']:<4} "
              f"{o['loss_first']:>9.5f}/{r['loss_first']:<9.5f} {o['loss_last']:>8.5f}/{r['loss_last']:<8.5f} "
              f"{o['p_target_after']:>7.4f}/{r['p_target_after']:<7.4f} "
              f"{str(o['target_wins'])[0]:>4}/{str(r['target_wins'])[0]:<4} "
              f"{o['seconds']:>7.2f}/{r['seconds']:<7.2f}")

    if args.factors:
        import torch
        from safetensors.torch import load_file

        mine = load_file(args.factors)
        # The run's journal: full chunks of edits, then one file per edit after the last chunk.
        updates = Path(args.run) / "updates"
        files = sorted(updates.glob("chunk-*.safetensors")) + sorted(updates.glob("edit-*.safetensors"))
        tensors = [load_file(str(f)) for f in files]
        theirs = {k: torch.cat([t[k] for t in tensors]) for k in ("r", "u", "key", "n_updates")}
        # Row of each edit's first update (landing may add more; the reference makes one).
        first = [0]
        for count in theirs["n_updates"].tolist():
            first.append(first[-1] + int(count))
        worst = {}
        for name, ours in (("key", "key"), ("r", "r"), ("u", "u")):
            errs = [((theirs[ours][first[i]].double() - mine[name][i].double()).norm()
                     / theirs[ours][first[i]].double().norm()).item() for i in range(n)]
            worst[name] = max(errs)
        ok &= all(v <= args.max_rel_err for v in worst.values())
        print("rank-one factors, max relative difference over the edits: "
              + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))

    mo = statistics.median(o["seconds"] for o in oedit[:n])
    mr = statistics.median(r["seconds"] for r in ref[:n])
    v_steps = json.loads((Path(args.run) / "manifest.json").read_text())["hparams"]["v_steps"]
    # Forward evaluations of the v* loop: one per step, plus the one that met stop_loss.
    evals = lambda steps: steps if steps >= v_steps else steps + 1
    vo = statistics.median(o["phases"]["value"] / evals(o["steps"]) for o in oedit[:n])
    vr = statistics.median(r["phases"]["value"] / max(len(r["losses"]), 1) for r in ref[:n])
    print(f"edits compared: {n}; target wins: oedit {sum(o['target_wins'] for o in oedit[:n])}, "
          f"pytorch {sum(bool(r['target_wins']) for r in ref[:n])}")
    print(f"median seconds per edit: oedit {mo:.3f}, pytorch {mr:.3f}, ratio pytorch/oedit {mr / mo:.2f}")
    print(f"median seconds per v* evaluation: oedit {vo:.3f}, pytorch {vr:.3f}, ratio {vr / vo:.2f}")
    print(json.dumps({"edits": n, "median_seconds_oedit": mo, "median_seconds_pytorch": mr,
                      "ratio": mr / mo, "outcomes_agree": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

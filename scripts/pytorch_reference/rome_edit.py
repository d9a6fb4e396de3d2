#!/usr/bin/env python3
"""A plain PyTorch reference implementation of the edit `oedit edit --method rome` computes.

Written from the maths in docs/method.md (not from the ROME or EasyEdit code), in the usual
PyTorch style of such reference code: a Hugging Face model, forward hooks on the edited layer's
MLP down-projection, and a full forward pass (all layers, all positions, full log-softmax) at
every optimisation step. It is what a user who compares oedit with "the PyTorch way" would run.

    .venv-ref/bin/python scripts/pytorch_reference/rome_edit.py \
        --model HF_DIR --run OEDIT_RUN_DIR --edits data/counterfact-sample.jsonl --limit 10

Inputs taken from oedit so that both compute the same edit:
  * the context templates and the hyper-parameters: OEDIT_RUN_DIR/manifest.json
    (`templates`, `hparams`: layer, v_steps, v_lr, kl_weight, weight_decay, clamp_norm_factor,
    stop_loss, cov_regularization);
  * the key statistics C = E[k kᵀ]: the oedit cache file (tensor `second_moment`, f64 [f, f]);
    by default the path is derived from the manifest as oedit does
    ($OEDIT_CACHE/stats or ~/.cache/oedit/stats, <fingerprint>-layer<L>-<tokens>tok-corpus<hash>);
  * the records: the first --limit lines of a CounterFact JSONL file.

One edit (applied sequentially, each against the weights left by the previous ones):
  key     one forward pass over the templated prompts (+ teacher-forced target tokens) and the
          essence prompt "{subject} is a"; hooks read the down-projection input (key) and output
          at the subject's last token: k* = mean key, v_orig = mean output over the templates;
          p0 = next-token distribution of the essence prompt.
  value   δ ∈ R^d is added (forward hook) to the down-projection output at the subject's last
          token of every row; Adam(lr = v_lr) minimises
            mean target NLL + kl_weight·KL(p0 ‖ p_δ) + weight_decay·‖δ‖²/‖v_orig‖²,
          ‖δ‖ clamped to clamp_norm_factor·‖v_orig‖ after each step, stopping once the NLL is
          below stop_loss (at most v_steps steps). v* = v_orig + δ.
  update  r = v* − W k* (current W), u = C_reg⁻¹k* / (k*ᵀC_reg⁻¹k*), C_reg = C + λ·mean(diag C)·I,
          W ← W + r uᵀ (computed in f64, applied in f32 as oedit does).

Output: one JSON line per edit on stdout
  {"index", "seconds", "phases": {"key", "value", "update"}, "steps", "loss_first", "loss_last",
   "p_target_after", ...}
and a last line {"summary": true, "median_seconds", ...}. "seconds" covers what oedit's log
`seconds` covers (target probability before, key, value, update, target probability after).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from check_export import transformers_quiet  # same folder; stdlib-only at import time


# ----------------------------------------------------------------------------------------------
# Records, prompts and tokenisation (the conventions of oedit's tokenizer.rs and prompts.rs)
# ----------------------------------------------------------------------------------------------

def read_records(path, limit):
    """First `limit` records of a CounterFact JSONL (flat EasyEdit form or ROME form)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            o = json.loads(line)
            if "requested_rewrite" in o:
                rw = o["requested_rewrite"]
                rec = {
                    "case_id": o.get("case_id"),
                    "prompt": rw["prompt"].replace("{}", rw["subject"], 1),
                    "subject": rw["subject"],
                    "target_new": rw["target_new"]["str"].strip(),
                    "ground_truth": (rw.get("target_true") or {}).get("str"),
                }
            else:
                rec = {
                    "case_id": o.get("case_id"),
                    "prompt": o["prompt"],
                    "subject": o["subject"],
                    "target_new": (o.get("target_new") or o.get("target")).strip(),
                    "ground_truth": o.get("ground_truth"),
                }
            if rec["ground_truth"] is not None:
                rec["ground_truth"] = rec["ground_truth"].strip()
            if rec["subject"] not in rec["prompt"]:
                raise ValueError(f"{path}: subject {rec['subject']!r} not in prompt {rec['prompt']!r}")
            out.append(rec)
            if len(out) >= limit:
                break
    return out


class Tok:
    def __init__(self, hf_tokenizer):
        self.t = hf_tokenizer

    def prompt(self, text):
        """Ids with the tokenizer's own special tokens (oedit's encode_prompt)."""
        return self.t(text)["input_ids"]

    def plain(self, text):
        return self.t(text, add_special_tokens=False)["input_ids"]

    def continuation(self, prompt, answer):
        """Tokens of `answer` continuing `prompt`: the suffix of tokenize(prompt + " " + answer)
        after tokenize(prompt) (oedit's encode_continuation)."""
        sep = "" if (not prompt or prompt[-1].isspace()) else " "
        answer = answer.strip()
        p = self.prompt(prompt)
        full = self.prompt(f"{prompt}{sep}{answer}")
        if len(full) > len(p) and full[: len(p)] == p:
            return full[len(p):]
        return self.plain(f"{sep}{answer}")

    def last_token_of_prefix(self, text, upto):
        n = len(self.prompt(text[:upto]))
        if n == 0:
            raise ValueError("the subject produces no tokens")
        return n - 1


def build_prompts(tok, rec, templates):
    """Rows: every templated prompt followed by the target tokens but the last, then the essence
    prompt "{subject} is a". Positions are indices of real tokens (the batch is right-padded)."""
    start = rec["prompt"].find(rec["subject"])
    end = start + len(rec["subject"])
    target = tok.continuation(rec["prompt"], rec["target_new"])
    if not target:
        raise ValueError(f"target {rec['target_new']!r} produces no tokens")
    rows, subject_last, prompt_last = [], [], []
    for t in templates:
        text = t.replace("{}", rec["prompt"], 1)
        offset = max(t.find("{}"), 0)
        ids = tok.prompt(text)
        subject_last.append(min(tok.last_token_of_prefix(text, offset + end), len(ids) - 1))
        prompt_last.append(len(ids) - 1)
        rows.append(ids + target[:-1])
    essence = f"{rec['subject']} is a"
    ids = tok.prompt(essence)
    subject_last.append(min(tok.last_token_of_prefix(essence, len(rec["subject"])), len(ids) - 1))
    rows.append(ids)
    return rows, subject_last, prompt_last, target


def pad_batch(torch, rows, pad_id):
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------
# The hooks on the edited layer's down-projection
# ----------------------------------------------------------------------------------------------

class DownProjHook:
    """Forward hook on `mlp.down_proj`: records its input (the keys) and output at chosen
    positions, and adds a vector δ to its output at those positions when one is set."""

    def __init__(self, module):
        self.rows = None
        self.cols = None
        self.capture = False
        self.delta = None
        self.keys = None
        self.values = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        if self.capture:
            self.keys = inputs[0][self.rows, self.cols].detach()
            self.values = output[self.rows, self.cols].detach()
        if self.delta is not None:
            mask = output.new_zeros(output.shape[:-1] + (1,))
            mask[self.rows, self.cols] = 1.0
            return output + mask * self.delta
        return output

    def remove(self):
        self.handle.remove()


# ----------------------------------------------------------------------------------------------
# One edit
# ----------------------------------------------------------------------------------------------

def score_target(torch, model, tok, rec, pad_id):
    """(P(target_new | prompt), target_new beats ground_truth by mean NLL), as oedit's log
    computes p_target_before/after and target_wins."""
    answers = [rec["target_new"]] + ([rec["ground_truth"]] if rec.get("ground_truth") else [])
    p = tok.prompt(rec["prompt"])
    rows, spans = [], []
    for a in answers:
        ids = tok.continuation(rec["prompt"], a)
        rows.append(p + ids[:-1])
        spans.append(ids)
    ids, mask = pad_batch(torch, rows, pad_id)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    sums = []
    for r, a in enumerate(spans):
        pos = torch.arange(len(p) - 1, len(p) - 1 + len(a))
        sums.append(-lp[r, pos, torch.tensor(a)].double().sum().item())
    means = [s / len(a) for s, a in zip(sums, spans)]
    wins = means[0] < means[1] if len(means) > 1 else None
    return float(torch.exp(torch.tensor(-sums[0], dtype=torch.float64))), wins


def edit_one(torch, model, tok, hook, down, rec, templates, hp, chol, pad_id):
    t_start = time.perf_counter()
    p_before, _ = score_target(torch, model, tok, rec, pad_id)

    # --- key: k*, v_orig and the essence distribution p0, one forward pass --------------------
    t0 = time.perf_counter()
    rows, subject_last, prompt_last, target = build_prompts(tok, rec, templates)
    ids, mask = pad_batch(torch, rows, pad_id)
    n_rows = len(rows)
    n_tpl = len(templates)
    hook.rows = torch.arange(n_rows)
    hook.cols = torch.tensor(subject_last)
    hook.capture = True
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    hook.capture = False
    k_star = hook.keys[:n_tpl].mean(0).double()
    v_orig = hook.values[:n_tpl].mean(0).double()
    kl_pos = len(rows[-1]) - 1
    lp0 = torch.log_softmax(logits[n_rows - 1, kl_pos].float(), dim=-1).detach()
    p0 = lp0.exp()
    t_key = time.perf_counter() - t0

    # --- value: optimise δ with a full forward pass per step ----------------------------------
    t1 = time.perf_counter()
    tgt_rows = torch.tensor([r for r in range(n_tpl) for _ in target])
    tgt_pos = torch.tensor([prompt_last[r] + j for r in range(n_tpl) for j in range(len(target))])
    tgt_ids = torch.tensor([t for _ in range(n_tpl) for t in target])
    v_norm = max(v_orig.norm().item(), 1e-12)
    max_norm = hp["clamp_norm_factor"] * v_norm
    delta = torch.zeros(v_orig.shape[0], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp["v_lr"])
    hook.delta = delta
    loss_first = loss_last = nll_last = float("nan")
    losses = []
    steps = 0
    try:
        for step in range(hp["v_steps"]):
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            nll = -log_probs[tgt_rows, tgt_pos, tgt_ids].sum() / (len(target) * n_tpl)
            lp = log_probs[n_rows - 1, kl_pos]
            kl = (p0 * (lp0 - lp)).sum()
            wd = hp["weight_decay"] * delta.pow(2).sum() / (v_norm * v_norm)
            loss = nll + hp["kl_weight"] * kl + wd
            loss_v, nll_v = loss.item(), nll.item()
            losses.append(round(loss_v, 6))
            if step == 0:
                loss_first = loss_v
            loss_last, nll_last = loss_v, nll_v
            if nll_v < hp["stop_loss"]:
                break
            loss.backward()
            opt.step()
            steps = step + 1
            with torch.no_grad():
                norm = delta.norm().item()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    finally:
        hook.delta = None
    v_star = v_orig + delta.detach().double()
    t_value = time.perf_counter() - t1

    # --- update: r = v* − W k*, u = C_reg⁻¹k* / (k*ᵀ C_reg⁻¹ k*), W += r uᵀ ------------------
    t2 = time.perf_counter()
    with torch.no_grad():
        W = down.weight
        r = v_star - W.double() @ k_star
        z = torch.cholesky_solve(k_star.unsqueeze(1), chol).squeeze(1)
        denom = torch.dot(k_star, z).item()
        if not denom > 0:
            raise RuntimeError(f"k*ᵀ C⁻¹ k* is not positive ({denom})")
        u = z / denom
        W.add_(torch.outer(r.float(), u.float()))
    t_update = time.perf_counter() - t2

    p_after, wins = score_target(torch, model, tok, rec, pad_id)
    seconds = time.perf_counter() - t_start
    row = {
        "seconds": seconds,
        "phases": {"key": t_key, "value": t_value, "update": t_update},
        "steps": steps,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "nll_last": nll_last,
        "p_target_before": p_before,
        "p_target_after": p_after,
        "target_wins": wins,
        "update_norm": r.norm().item() * u.norm().item(),
        "losses": losses,
    }
    factors = (r.float(), u.float(), k_star.float())
    return row, factors


# ----------------------------------------------------------------------------------------------

def default_stats_path(manifest):
    cache = os.environ.get("OEDIT_CACHE")
    base = Path(cache) / "stats" if cache else Path.home() / ".cache" / "oedit" / "stats"
    m = manifest
    name = (f"{m['model']['fingerprint']}-layer{m['hparams']['layer']}-{m['stats']['tokens']}tok"
            f"-corpus{m['stats']['corpus_hash']}.safetensors")
    return base / name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face folder (e.g. from `oedit export`)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="oedit run directory whose manifest.json gives templates and hparams")
    src.add_argument("--manifest", help="an oedit manifest.json")
    ap.add_argument("--stats", help="oedit key-statistics file (default: derived from the manifest)")
    ap.add_argument("--edits", required=True, help="CounterFact JSONL")
    ap.add_argument("--limit", type=int, default=10, help="edit the first N records (default 10)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--save-factors", help="write r [n,d], u [n,f], key [n,f] (f32) to this safetensors file")
    ap.add_argument("--save-model", help="write the edited model as a Hugging Face folder here")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed warm-up forward/backward pass (one-time allocator and "
                         "kernel set-up that would otherwise land in the first edit's time)")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    transformers_quiet()
    manifest_path = Path(args.manifest) if args.manifest else Path(args.run) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("method") != "rome":
        print(f"warning: {manifest_path} is a `{manifest.get('method')}` run; this script always applies "
              "plain ROME updates (the same k*, v* for the first edit, different updates after it)",
              file=sys.stderr)
    hp = manifest["hparams"]
    templates = manifest["templates"]
    layer = hp["layer"]
    stats_path = Path(args.stats) if args.stats else default_stats_path(manifest)
    if not stats_path.is_file():
        sys.exit(f"error: key statistics {stats_path} not found (run oedit once with this model, "
                 "layer and corpus, or give --stats)")

    t_load = time.perf_counter()
    hf_tok = AutoTokenizer.from_pretrained(args.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = Tok(hf_tok)
    cfg = model.config
    pad_id = hf_tok.pad_token_id
    if pad_id is None:
        eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
        pad_id = eos if eos is not None else (cfg.bos_token_id or 0)
    down = model.model.layers[layer].mlp.down_proj
    hook = DownProjHook(down)

    # C_reg = C + λ·mean(diag C)·I, factored once per run (oedit does the same).
    C = load_file(str(stats_path))["second_moment"].double()
    if C.shape != (down.in_features, down.in_features):
        sys.exit(f"error: {stats_path} holds C of shape {tuple(C.shape)}, layer {layer} has keys of "
                 f"width {down.in_features}")
    mean_diag = max(C.diagonal().mean().item(), 1e-12)
    C_reg = C + hp["cov_regularization"] * mean_diag * torch.eye(C.shape[0], dtype=torch.float64)
    chol = torch.linalg.cholesky(C_reg)
    records = read_records(args.edits, args.limit)
    print(json.dumps({"setup": True, "model": args.model, "layer": layer, "templates": len(templates),
                      "stats": str(stats_path), "records": len(records), "threads": args.threads,
                      "torch": torch.__version__, "load_seconds": round(time.perf_counter() - t_load, 2)}),
          flush=True)

    if not args.no_warmup and records:
        # One untimed forward + backward of the first record's batch, without hooks' effects.
        wrows, _, _, _ = build_prompts(tok, records[0], templates)
        wids, wmask = pad_batch(torch, wrows, pad_id)
        emb = model.get_input_embeddings()(wids).detach().requires_grad_(True)
        model(inputs_embeds=emb, attention_mask=wmask).logits.float().log_softmax(-1)[..., 0].sum().backward()
        del emb, wids, wmask

    rows, factors = [], []
    for i, rec in enumerate(records):
        row, fac = edit_one(torch, model, tok, hook, down, rec, templates, hp, chol, pad_id)
        row = {"index": i, "case_id": rec["case_id"], "subject": rec["subject"],
               "target_new": rec["target_new"], **row}
        rows.append(row)
        factors.append(fac)
        print(json.dumps(row), flush=True)
    hook.remove()

    if args.save_factors:
        save_file({"r": torch.stack([f[0] for f in factors]).contiguous(),
                   "u": torch.stack([f[1] for f in factors]).contiguous(),
                   "key": torch.stack([f[2] for f in factors]).contiguous()}, args.save_factors)
    if args.save_model:
        model.save_pretrained(args.save_model)
        hf_tok.save_pretrained(args.save_model)
    secs = [r["seconds"] for r in rows]
    print(json.dumps({
        "summary": True,
        "edits": len(rows),
        "median_seconds": statistics.median(secs) if secs else None,
        "median_value_seconds": statistics.median(r["phases"]["value"] for r in rows) if rows else None,
        "median_step_seconds": statistics.median(r["phases"]["value"] / max(len(r["losses"]), 1)
                                                 for r in rows) if rows else None,
        "target_wins": sum(bool(r["target_wins"]) for r in rows),
    }), flush=True)


if __name__ == "__main__":
    main()

"""Writes a random-weight Llama folder (config.json, model.safetensors, tokenizer) for the CUDA check.
usage: gen_random.py OUT smol|7b"""
import json, os, shutil, struct, sys, torch

out, shape = sys.argv[1], sys.argv[2]
here = os.path.dirname(os.path.abspath(__file__))  # the bundle: smol-config.json, tokenizer
cfg = json.load(open(os.path.join(here, "smol-config.json")))
if shape == "7b":
    cfg.update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, torch_dtype="bfloat16",
               tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=10000.0)
    dt, tag = torch.bfloat16, "BF16"
else:
    cfg["torch_dtype"] = "float32"
    dt, tag = torch.float32, "F32"
h, m, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
hd = h // cfg["num_attention_heads"]
kv = cfg["num_key_value_heads"] * hd
shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
if not cfg["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (v, h)
for i in range(L):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                   p + "mlp.down_proj.weight": (h, m), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)})
os.makedirs(out, exist_ok=True)
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator(device=dev).manual_seed(0)
header, off, esz = {}, 0, torch.finfo(dt).bits // 8
for name, s in shapes.items():
    n = 1
    for d in s:
        n *= d
    header[name] = {"dtype": tag, "shape": list(s), "data_offsets": [off, off + n * esz]}
    off += n * esz
hb = json.dumps(header).encode()
hb += b" " * (-len(hb) % 8)
with open(os.path.join(out, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(hb)))
    f.write(hb)
    for name, s in shapes.items():
        if len(s) == 1:
            t = torch.ones(s, dtype=dt, device=dev)
        else:
            t = (torch.randn(s, generator=g, device=dev, dtype=torch.float32) * 0.02).to(dt)
        f.write(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
for t in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(here, t), out)
print(f"{out}: {off / 1e9:.2f} GB of {tag} weights, {sum(1 for _ in shapes)} tensors")

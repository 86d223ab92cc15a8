#!/usr/bin/env python3
"""Random DeepSeek-V2/V3-shaped model directories for GPU tests and benchmarks.

Usage:
  make_bench_models.py --tiny OUT    small V3 (bf16 and FP8, with one MTP layer)
                                     and V2 models; pure Python, runs anywhere
  make_bench_models.py --bench OUT   V2-Lite-shaped bf16 and FP8, and a 4-layer
                                     DeepSeek-V3 slice in FP8; needs torch (GPU)

Weights are random but scaled as trained ones are (std 1/sqrt(fan_in), norms
near 1), in the official layout: model.safetensors with the transformers
tensor names and, for FP8, e4m3 weights with float32 weight_scale_inv per
128x128 block (router, embeddings, heads and norms stay bf16, as in V3).
A directory that already holds a complete model is kept.
"""
import array
import bisect
import json
import math
import os
import random
import struct
import sys

BLOCK = 128


def v3_config(tiny):
    if tiny:
        c = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                 num_hidden_layers=3, num_nextn_predict_layers=1, num_attention_heads=4,
                 n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4, first_k_dense_replace=1,
                 n_group=4, topk_group=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                 qk_rope_head_dim=32, v_head_dim=32, max_position_embeddings=4096)
    else:
        c = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                 num_hidden_layers=4, num_nextn_predict_layers=0, num_attention_heads=128,
                 n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=1,
                 n_group=8, topk_group=4, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840)
    c.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], moe_layer_freq=1,
             norm_topk_prob=True, routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
             rms_norm_eps=1e-6, rope_theta=10000, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
             hidden_act="silu", torch_dtype="bfloat16",
             rope_scaling=dict(type="yarn", factor=40 if not tiny else 4, beta_fast=32, beta_slow=1, mscale=1.0,
                               mscale_all_dim=1.0,
                               original_max_position_embeddings=4096 if not tiny else 1024))
    return c


def v2_config(tiny):
    if tiny:
        c = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                 num_hidden_layers=3, num_attention_heads=4, n_shared_experts=2, n_routed_experts=16,
                 num_experts_per_tok=4, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
                 v_head_dim=32, max_position_embeddings=4096)
    else:  # DeepSeek-V2-Lite
        c = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                 num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
                 num_experts_per_tok=6, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                 v_head_dim=128, max_position_embeddings=163840)
    c.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], num_nextn_predict_layers=0,
             first_k_dense_replace=1, moe_layer_freq=1, n_group=1, topk_group=1, q_lora_rank=None,
             norm_topk_prob=False, routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy",
             rms_norm_eps=1e-6, rope_theta=10000, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
             hidden_act="silu", torch_dtype="bfloat16",
             rope_scaling=dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, mscale=0.707,
                               mscale_all_dim=0.707, original_max_position_embeddings=4096))
    return c


def tensors(c, fp8):
    """(name, shape, kind, quantize) in file order; kind: w (matrix), n (norm), b (bias), e (embedding)."""
    H, nh = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], H), "e", False)]
    n_layers = c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 0)
    for L in range(n_layers):
        p = "model.layers.%d." % L
        mtp = L >= c["num_hidden_layers"]
        if mtp:
            out += [(p + "embed_tokens.weight", (c["vocab_size"], H), "e", False),
                    (p + "enorm.weight", (H,), "n", False), (p + "hnorm.weight", (H,), "n", False),
                    (p + "eh_proj.weight", (H, 2 * H), "w", fp8)]
        out += [(p + "input_layernorm.weight", (H,), "n", False),
                (p + "post_attention_layernorm.weight", (H,), "n", False)]
        a = p + "self_attn."
        if c["q_lora_rank"]:
            out += [(a + "q_a_proj.weight", (c["q_lora_rank"], H), "w", fp8),
                    (a + "q_a_layernorm.weight", (c["q_lora_rank"],), "n", False),
                    (a + "q_b_proj.weight", (nh * qk, c["q_lora_rank"]), "w", fp8)]
        else:
            out.append((a + "q_proj.weight", (nh * qk, H), "w", fp8))
        out += [(a + "kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + c["qk_rope_head_dim"], H), "w", fp8),
                (a + "kv_a_layernorm.weight", (c["kv_lora_rank"],), "n", False),
                (a + "kv_b_proj.weight", (nh * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]), "w",
                 fp8),
                (a + "o_proj.weight", (H, nh * c["v_head_dim"]), "w", fp8)]
        moe = c["n_routed_experts"] and L >= c["first_k_dense_replace"]
        m = p + "mlp."
        if moe:
            E, I = c["n_routed_experts"], c["moe_intermediate_size"]
            out.append((m + "gate.weight", (E, H), "w", False))
            if c["topk_method"] == "noaux_tc":
                out.append((m + "gate.e_score_correction_bias", (E,), "b", False))
            for x in range(E):
                q = m + "experts.%d." % x
                out += [(q + "gate_proj.weight", (I, H), "w", fp8), (q + "up_proj.weight", (I, H), "w", fp8),
                        (q + "down_proj.weight", (H, I), "w", fp8)]
            S = I * c["n_shared_experts"]
            if S:
                q = m + "shared_experts."
                out += [(q + "gate_proj.weight", (S, H), "w", fp8), (q + "up_proj.weight", (S, H), "w", fp8),
                        (q + "down_proj.weight", (H, S), "w", fp8)]
        else:
            I = c["intermediate_size"]
            out += [(m + "gate_proj.weight", (I, H), "w", fp8), (m + "up_proj.weight", (I, H), "w", fp8),
                    (m + "down_proj.weight", (H, I), "w", fp8)]
        if mtp:
            out += [(p + "shared_head.norm.weight", (H,), "n", False),
                    (p + "shared_head.head.weight", (c["vocab_size"], H), "w", False)]
    out += [("model.norm.weight", (H,), "n", False), ("lm_head.weight", (c["vocab_size"], H), "w", False)]
    return out


def layout(specs):
    """Header entries and total size: quantized weights get an F8 tensor and its scales."""
    hdr, off = {}, 0
    plan = []
    for name, shape, kind, q in specs:
        n = math.prod(shape)
        if q:
            hdr[name] = dict(dtype="F8_E4M3", shape=list(shape), data_offsets=[off, off + n])
            sname = name + "_scale_inv"
            sshape = [(shape[0] + BLOCK - 1) // BLOCK, (shape[1] + BLOCK - 1) // BLOCK]
            soff = off + n
            hdr[sname] = dict(dtype="F32", shape=sshape, data_offsets=[soff, soff + 4 * math.prod(sshape)])
            plan.append((name, shape, kind, True, off, soff))
            off = soff + 4 * math.prod(sshape)
        else:
            dt = "F32" if kind == "b" else "BF16"
            size = n * (4 if kind == "b" else 2)
            hdr[name] = dict(dtype=dt, shape=list(shape), data_offsets=[off, off + size])
            plan.append((name, shape, kind, False, off, None))
            off += size
    return hdr, plan, off


# ---- pure-Python values (tiny models) ----
E4M3 = []
for code in range(0x7f):  # positive, finite
    e, mant = code >> 3, code & 7
    E4M3.append((mant / 8) * 2.0 ** -6 if e == 0 else (1 + mant / 8) * 2.0 ** (e - 7))
E4M3_SORTED = sorted((v, i) for i, v in enumerate(E4M3))
E4M3_VALS = [v for v, _ in E4M3_SORTED]


def e4m3(x):
    a = min(abs(x), 448.0)
    i = bisect.bisect_left(E4M3_VALS, a)
    if i == len(E4M3_VALS) or (i > 0 and a - E4M3_VALS[i - 1] <= E4M3_VALS[i] - a):
        i -= 1
    return E4M3_SORTED[i][1] | (0x80 if x < 0 else 0)


def py_values(rng, shape, kind):
    n = math.prod(shape)
    if kind == "n":
        return [1.0 + 0.1 * rng.gauss(0, 1) for _ in range(n)]
    if kind == "b":
        return [0.05 * rng.gauss(0, 1) for _ in range(n)]
    std = 1.0 if kind == "e" else 1.0 / math.sqrt(shape[-1])
    return [std * rng.gauss(0, 1) for _ in range(n)]


def py_bf16(vals):
    b = array.array("f", vals).tobytes()
    out = bytearray(len(vals) * 2)
    out[0::2] = b[2::4]
    out[1::2] = b[3::4]
    return bytes(out)


def py_fp8(vals, shape):
    rows, cols = shape
    sr, sc = (rows + BLOCK - 1) // BLOCK, (cols + BLOCK - 1) // BLOCK
    scales = [0.0] * (sr * sc)
    for r in range(rows):
        for c in range(cols):
            i = (r // BLOCK) * sc + c // BLOCK
            scales[i] = max(scales[i], abs(vals[r * cols + c]))
    scales = [max(s, 1e-12) / 448.0 for s in scales]
    codes = bytearray(rows * cols)
    for r in range(rows):
        base = (r // BLOCK) * sc
        for c in range(cols):
            codes[r * cols + c] = e4m3(vals[r * cols + c] / scales[base + c // BLOCK])
    return bytes(codes), struct.pack("<%df" % len(scales), *scales)


# ---- torch values (benchmark models, generated on the GPU) ----
def torch_write(f, plan, seed):
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    for name, shape, kind, q, off, soff in plan:
        if kind == "n":
            t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=dev)
        elif kind == "b":
            t = 0.05 * torch.randn(shape, generator=g, device=dev)
        else:
            std = 1.0 if kind == "e" else 1.0 / math.sqrt(shape[-1])
            t = std * torch.randn(shape, generator=g, device=dev)
        f.seek(off)
        if q:
            rows, cols = shape
            sr, sc = (rows + BLOCK - 1) // BLOCK, (cols + BLOCK - 1) // BLOCK
            pad = torch.zeros(sr * BLOCK, sc * BLOCK, device=dev)
            pad[:rows, :cols] = t
            blk = pad.view(sr, BLOCK, sc, BLOCK)
            s = blk.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
            qv = (blk / s[:, None, :, None]).view(sr * BLOCK, sc * BLOCK)[:rows, :cols]
            f.write(qv.to(torch.float8_e4m3fn).contiguous().view(torch.uint8).cpu().numpy().tobytes())
            f.seek(soff)
            f.write(s.float().contiguous().cpu().numpy().tobytes())
        elif kind == "b":
            f.write(t.float().contiguous().cpu().numpy().tobytes())
        else:
            f.write(t.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().tobytes())


def write_model(path, cfg, fp8, seed, use_torch):
    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        return
    os.makedirs(path, exist_ok=True)
    if fp8:
        cfg = dict(cfg, quantization_config=dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                                 weight_block_size=[BLOCK, BLOCK]))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    hdr, plan, total = layout(tensors(cfg, fp8))
    hdr["__metadata__"] = {"format": "pt"}
    hj = json.dumps(hdr, separators=(",", ":")).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        base = f.tell()
        f.truncate(base + total)

        class Shifted:
            def seek(self, o):
                f.seek(base + o)

            def write(self, b):
                f.write(b)

        sf = Shifted()
        if use_torch:
            torch_write(sf, plan, seed)
        else:
            rng = random.Random(seed)
            for name, shape, kind, q, off, soff in plan:
                vals = py_values(rng, shape, kind)
                sf.seek(off)
                if q:
                    codes, scales = py_fp8(vals, shape)
                    sf.write(codes)
                    sf.seek(soff)
                    sf.write(scales)
                elif kind == "b":
                    sf.write(struct.pack("<%df" % len(vals), *vals))
                else:
                    sf.write(py_bf16(vals))
    open(done, "w").close()
    print("wrote %s (%.2f GB)" % (path, total / 1e9), flush=True)


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("--tiny", "--bench"):
        sys.exit(__doc__)
    out = sys.argv[2]
    if sys.argv[1] == "--tiny":
        write_model(os.path.join(out, "v3-bf16"), v3_config(True), False, 1, False)
        write_model(os.path.join(out, "v3-fp8"), v3_config(True), True, 1, False)
        write_model(os.path.join(out, "v2-bf16"), v2_config(True), False, 2, False)
        # FP8 with 6 experts a token (V2-Lite's): plan bounds T * 6 + 15 E
        # that are not multiples of 4 for odd T (the FP8 scales' stride)
        write_model(os.path.join(out, "v2-fp8-k6"), dict(v2_config(True), num_experts_per_tok=6), True, 5, False)
    else:
        write_model(os.path.join(out, "v2lite-bf16"), v2_config(False), False, 3, True)
        write_model(os.path.join(out, "v2lite-fp8"), v2_config(False), True, 3, True)
        write_model(os.path.join(out, "v3slice-fp8"), v3_config(False), True, 4, True)


if __name__ == "__main__":
    main()

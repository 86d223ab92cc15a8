#!/usr/bin/env python3
"""Tiny random DeepSeek models + transformers reference outputs for dsd's tests.

Writes three model directories in the OFFICIAL DeepSeek checkpoint layout
(config.json + model.safetensors, one tensor per expert, MTP layer stored as
layer index num_hidden_layers) and, under <dir>/ref/, the float32 reference
computed by transformers (eager attention, float32, CPU):

  v3      DeepSeek-V3 style: q LoRA, YaRN, sigmoid router with
          e_score_correction_bias + group-limited top-k (noaux_tc), MTP, bf16
  v2lite  DeepSeek-V2-Lite style: no q LoRA, softmax greedy router,
          2 shared experts, no rope scaling, no MTP, bf16
  fp8     V3 style with 128x128 block-scaled F8_E4M3 linear weights
          (weight_scale_inv), dims that leave partial edge blocks, MTP

    python3 tools/make_fixtures.py --out tests/fixtures          # build + check
    python3 tools/make_fixtures.py --out tests/fixtures --check  # check only

The reference model is fed the exact values the checkpoint stores (bf16
rounded, or fp8 * scale), upcast to float32.  The check reloads each exported
directory with from_pretrained and compares against the saved reference.
transformers has no MTP forward, so the MTP reference is built here from the
transformers decoder-layer class (see mtp_forward).
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

SEQ_LENS = [1, 2, 7, 33, 64, 100]
GREEDY = {3: 5, 5: 12}  # sequence index -> prompt length
GREEDY_NEW = 16

# Fused-expert layout assumed for transformers 5 (checked against its own
# loader in check()): gate_up_proj [E, 2*I, H] with gate rows first,
# down_proj [E, H, I].
ASSUMED_LAYOUT = {"gate_up": "gate_first", "gate_up_T": False, "down_T": False}


def base_cfg():
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "seq_aux": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 1024,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "moe_layer_freq": 1,
    }


def v3_cfg():
    c = base_cfg()
    c.update({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "q_lora_rank": 96,
        "kv_lora_rank": 64,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 512,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "num_nextn_predict_layers": 1,
    })
    return c


def v2lite_cfg():
    c = base_cfg()
    c.update({
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "q_lora_rank": None,
        "kv_lora_rank": 64,
        "n_routed_experts": 16,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "max_position_embeddings": 512,
        "rope_scaling": None,
        "num_nextn_predict_layers": 0,
    })
    return c


def fp8_cfg():
    c = v3_cfg()
    # 192, 96, 160, 320 and 112 (kv_a rows) are not multiples of 128, so
    # every kind of partial edge block occurs.  Two layers (dense + MoE) plus
    # MTP and a 512-token vocabulary keep the directory near 4 MB; the router
    # and MoE path are the same as in v3.
    c.update({
        "vocab_size": 512,
        "hidden_size": 192,
        "intermediate_size": 320,
        "moe_intermediate_size": 96,
        "q_lora_rank": 160,
        "kv_lora_rank": 96,
        "num_hidden_layers": 2,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
    })
    return c


MODELS = [("v3", v3_cfg, 1001), ("v2lite", v2lite_cfg, 1002), ("fp8", fp8_cfg, 1003)]


# ----------------------------------------------------------------------------
# weights, official names


def gen_weights(cfg, seed):
    """Float32 master weights {official name: (tensor, kind)}.

    kind: 'lin' (2-D projection, fp8-quantized in the fp8 model), 'norm',
    'embed', 'head', 'router', 'bias'.  Projections are N(0, 1/in) so every
    activation stays O(1); lm_head is scaled for a logit spread of a few units.
    """
    g = torch.Generator().manual_seed(seed)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh = cfg["num_attention_heads"]
    nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    W = {}

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    def lin(name, rows, cols, gain=1.0):
        W[name] = (rn(rows, cols) * (gain / math.sqrt(cols)), "lin")

    def norm(name, n):
        W[name] = (1.0 + 0.1 * rn(n), "norm")

    def mlp(p, inter):
        lin(p + "gate_proj.weight", inter, H)
        lin(p + "up_proj.weight", inter, H)
        lin(p + "down_proj.weight", H, inter)

    def block(L):
        p = "model.layers.%d." % L
        a = p + "self_attn."
        if cfg["q_lora_rank"]:
            lin(a + "q_a_proj.weight", cfg["q_lora_rank"], H)
            norm(a + "q_a_layernorm.weight", cfg["q_lora_rank"])
            lin(a + "q_b_proj.weight", nh * (nope + rope), cfg["q_lora_rank"])
        else:
            lin(a + "q_proj.weight", nh * (nope + rope), H)
        lin(a + "kv_a_proj_with_mqa.weight", cfg["kv_lora_rank"] + rope, H)
        norm(a + "kv_a_layernorm.weight", cfg["kv_lora_rank"])
        lin(a + "kv_b_proj.weight", nh * (nope + vd), cfg["kv_lora_rank"])
        lin(a + "o_proj.weight", H, nh * vd)
        norm(p + "input_layernorm.weight", H)
        norm(p + "post_attention_layernorm.weight", H)
        if L < cfg["first_k_dense_replace"]:
            mlp(p + "mlp.", cfg["intermediate_size"])
            return
        E, mi = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        for e in range(E):
            mlp(p + "mlp.experts.%d." % e, mi)
        W[p + "mlp.gate.weight"] = (rn(E, H) * (1.0 / math.sqrt(H)), "router")
        if cfg["topk_method"] == "noaux_tc":
            # Positive, so that group masking fills (0.0 in transformers, -inf
            # in DeepSeek's reference code) can never be chosen; 0..0.15 moves
            # a real fraction of the top-k choices (measured and printed).
            W[p + "mlp.gate.e_score_correction_bias"] = (
                torch.rand(E, generator=g, dtype=torch.float32) * 0.15, "bias")
        mlp(p + "mlp.shared_experts.", mi * cfg["n_shared_experts"])

    W["model.embed_tokens.weight"] = (rn(V, H), "embed")
    for L in range(cfg["num_hidden_layers"]):
        block(L)
    norm("model.norm.weight", H)
    W["lm_head.weight"] = (rn(V, H) * (2.5 / math.sqrt(H)), "head")
    for k in range(cfg.get("num_nextn_predict_layers", 0)):
        L = cfg["num_hidden_layers"] + k
        block(L)
        p = "model.layers.%d." % L
        norm(p + "enorm.weight", H)
        norm(p + "hnorm.weight", H)
        lin(p + "eh_proj.weight", H, 2 * H)
        norm(p + "shared_head.norm.weight", H)
        W[p + "shared_head.head.weight"] = (W["lm_head.weight"][0].clone(), "head")
        W[p + "embed_tokens.weight"] = (W["model.embed_tokens.weight"][0].clone(), "embed")
    return W


def quant_fp8(w):
    """DeepSeek's 128x128 block quantization: scale = amax/448 per block,
    stored = w/scale as e4m3, weight_scale_inv = scale.  Returns
    (fp8 tensor, scale_inv [ceil(R/128), ceil(C/128)], float32 dequantized)."""
    R, C = w.shape
    br, bc = -(-R // 128), -(-C // 128)
    q = torch.empty(R, C, dtype=torch.float8_e4m3fn)
    s = torch.empty(br, bc, dtype=torch.float32)
    for i in range(br):
        for j in range(bc):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            sc = blk.abs().max() / torch.tensor(448.0, dtype=torch.float32)
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (blk / sc).to(torch.float8_e4m3fn)
            s[i, j] = sc
    return q, s, dequant_fp8(q, s)


def dequant_fp8(q, s):
    R, C = q.shape
    full = s.repeat_interleave(128, 0)[:R].repeat_interleave(128, 1)[:, :C]
    return q.to(torch.float32) * full


def materialize(W, fp8):
    """-> (stored {name: tensor as written}, values {name: float32 the
    reference uses}).  Values are exactly what the stored tensors decode to."""
    stored, values = {}, {}
    for name, (w, kind) in W.items():
        if kind == "bias":
            stored[name] = w.clone()
            values[name] = w.clone()
        elif fp8 and kind == "lin":
            q, s, d = quant_fp8(w)
            stored[name] = q
            stored[name[:-len(".weight")] + ".weight_scale_inv"] = s
            values[name] = d
        else:
            b = w.to(torch.bfloat16)
            stored[name] = b
            values[name] = b.to(torch.float32)
    return stored, values


def load_official(d):
    """Reads a directory's safetensors back into float32 values (dequantizing
    F8_E4M3 + weight_scale_inv), keyed by the official names."""
    from safetensors.torch import load_file
    raw = load_file(os.path.join(d, "model.safetensors"))
    out = {}
    for k, t in raw.items():
        if k.endswith(".weight_scale_inv"):
            continue
        si = k[:-len(".weight")] + ".weight_scale_inv" if k.endswith(".weight") else None
        if si in raw:
            out[k] = dequant_fp8(t, raw[si])
        else:
            out[k] = t.to(torch.float32)
    return out


# ----------------------------------------------------------------------------
# official names <-> transformers state_dict


EXPERT_RE = re.compile(r"^(.*\.experts)\.(gate_up_proj|gate_proj|up_proj|down_proj)(\.weight)?$")


def fuse(off, prefix, which, E, layout):
    def st(n):
        return torch.stack([off["%s.%d.%s_proj.weight" % (prefix, e, n)] for e in range(E)])

    if which == "gate_up_proj":
        parts = [st("gate"), st("up")]
        if layout["gate_up"] != "gate_first":
            parts.reverse()
        t = torch.cat(parts, dim=1)  # [E, 2I, H]
        return t.transpose(1, 2).contiguous() if layout["gate_up_T"] else t
    t = st(which[:-len("_proj")])  # [E, out, in]
    return t.transpose(1, 2).contiguous() if layout["down_T"] else t


def to_hf(off, target, layout, prefix=""):
    """Maps official per-expert tensors onto the names and shapes of a
    transformers state_dict `target` (fusing experts where it does)."""
    out, used = {}, set()
    for k, t in target.items():
        src = prefix + k
        if src in off:
            out[k] = off[src]
            used.add(src)
        else:
            m = EXPERT_RE.match(src)
            if not m:
                raise KeyError("no official tensor for transformers key %s" % k)
            E = t.shape[0]
            out[k] = fuse(off, m.group(1), m.group(2), E, layout)
            parts = ["gate", "up"] if m.group(2) == "gate_up_proj" else [m.group(2)[:-len("_proj")]]
            for e in range(E):
                for n in parts:
                    used.add("%s.%d.%s_proj.weight" % (m.group(1), e, n))
        if tuple(out[k].shape) != tuple(t.shape):
            raise ValueError("%s: shape %s, transformers wants %s" % (k, tuple(out[k].shape), tuple(t.shape)))
    return out, used


# ----------------------------------------------------------------------------
# transformers model, reference outputs


def make_model(cfg_dir, from_pretrained=False, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        if from_pretrained:
            return AutoModelForCausalLM.from_pretrained(cfg_dir, dtype=torch.float32, attn_implementation="eager", **kw)
        config = AutoConfig.from_pretrained(cfg_dir)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    except TypeError:  # transformers 4 spelling
        if from_pretrained:
            return AutoModelForCausalLM.from_pretrained(cfg_dir, torch_dtype=torch.float32,
                                                        attn_implementation="eager", **kw)
        config = AutoConfig.from_pretrained(cfg_dir)
        return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, attn_implementation="eager")


def causal_mask(n):
    m = torch.full((n, n), torch.finfo(torch.float32).min, dtype=torch.float32).triu(1)
    return m[None, None]


def run_layer(layer, x, pos, pe, mask):
    out = layer(x, attention_mask=mask, position_ids=pos, past_key_values=None, use_cache=False,
                cache_position=pos[0], position_embeddings=pe)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def manual_forward(model, ids):
    """Main model run layer by layer with the same calling convention the MTP
    reference uses; must equal model(ids).logits (validates that convention)."""
    m = model.model
    x = m.embed_tokens(ids[None])
    pos = torch.arange(ids.numel())[None]
    pe = m.rotary_emb(x, pos)
    mask = causal_mask(ids.numel())
    for layer in m.layers:
        x = run_layer(layer, x, pos, pe, mask)
    return model.lm_head(m.norm(x))[0]


def mtp_module(model, cfg, mtp_vals, layout):
    """The MTP block: a transformers decoder layer (MoE, since its layer index
    is past first_k_dense_replace) loaded with layer num_hidden_layers' weights,
    plus enorm/hnorm/eh_proj/shared_head as plain tensors."""
    L = cfg["num_hidden_layers"]
    p = "model.layers.%d." % L
    layer = type(model.model.layers[-1])(model.config, L - 1).to(torch.float32)
    sd, _ = to_hf(mtp_vals, layer.state_dict(), layout, prefix=p)
    layer.load_state_dict(sd, strict=True)
    layer.eval()
    norm_cls = type(model.model.norm)
    eps = cfg["rms_norm_eps"]
    mods = {}
    for n in ("enorm", "hnorm", "shared_head.norm"):
        nm = norm_cls(cfg["hidden_size"], eps=eps)
        nm.weight.data.copy_(mtp_vals[p + n + ".weight"])
        mods[n] = nm
    return {"layer": layer, "norms": mods, "eh": mtp_vals[p + "eh_proj.weight"],
            "head": mtp_vals[p + "shared_head.head.weight"], "embed": mtp_vals[p + "embed_tokens.weight"]}


@torch.no_grad()
def mtp_forward(model, mtp, ids):
    """x_p = eh_proj([enorm(embed(t_{p+1})); hnorm(h_p)]), p = 0..n-2, h_p the
    main model's final-normed hidden state; one causal decoder block over
    positions 0..n-2; logits = head(norm(out)).  Returns (logits, block out)."""
    n = ids.numel()
    h = model.model(input_ids=ids[None]).last_hidden_state[0]  # after model.norm
    e = mtp["norms"]["enorm"](F.embedding(ids[1:], mtp["embed"]))
    hh = mtp["norms"]["hnorm"](h[:n - 1])
    x = F.linear(torch.cat([e, hh], dim=-1), mtp["eh"])[None]
    pos = torch.arange(n - 1)[None]
    pe = model.model.rotary_emb(x, pos)
    out = run_layer(mtp["layer"], x, pos, pe, causal_mask(n - 1))[0]
    logits = F.linear(mtp["norms"]["shared_head.norm"](out), mtp["head"])
    return logits, out


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=ids[None]).logits[0].to(torch.float32)


@torch.no_grad()
def greedy(model, prompt):
    """transformers generate(do_sample=False), EOS disabled so that exactly
    GREEDY_NEW tokens come out; margins = top1 - top2 of each step's logits.
    Cross-checked against a no-cache argmax loop."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = model.generate(input_ids=prompt[None], do_sample=False, max_new_tokens=GREEDY_NEW,
                         min_new_tokens=GREEDY_NEW, return_dict_in_generate=True, output_logits=True,
                         eos_token_id=None, pad_token_id=0)
    new = out.sequences[0, prompt.numel():].tolist()
    margins = []
    for lg in out.logits:
        top = torch.topk(lg[0].to(torch.float32), 2).values
        margins.append(float(top[0] - top[1]))
    ids = prompt.clone()
    loop = []
    for _ in range(GREEDY_NEW):
        t = int(logits_of(model, ids)[-1].argmax())
        loop.append(t)
        ids = torch.cat([ids, torch.tensor([t])])
    return new, margins, loop


@torch.no_grad()
def router_bias_effect(model, cfg, seqs):
    """Fraction of (MoE layer, token) pairs whose chosen expert set changes
    when e_score_correction_bias is zeroed; and how many choices would differ
    between 0.0- and -inf-filled group masking (must be 0)."""
    gates = [l.mlp.gate for l in model.model.layers if hasattr(l.mlp, "gate")]
    caught = []
    hooks = [gm.register_forward_pre_hook(lambda mod, a: caught.append((mod, a[0].detach().clone())))
             for gm in gates]
    for ids in seqs:
        model(input_ids=ids[None])
    for h in hooks:
        h.remove()

    def own(mod, x):
        # DeepSeek-V3 noaux_tc: bias only for choosing; groups ranked by the
        # sum of their top-2 biased scores; top-k inside the top groups.
        E, G, K = cfg["n_routed_experts"], cfg["n_group"], cfg["num_experts_per_tok"]
        s = torch.sigmoid(F.linear(x.reshape(-1, x.shape[-1]).float(), mod.weight.float()))
        c = s + mod.e_score_correction_bias
        gs = c.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)
        gi = gs.topk(cfg["topk_group"], dim=-1).indices
        keep = torch.zeros_like(gs).scatter_(1, gi, 1).bool().repeat_interleave(E // G, dim=1)
        return c.masked_fill(~keep, float("-inf")).topk(K, dim=-1).indices

    used = []

    def chosen(mod, x):
        try:
            out = mod(x)
            out = out if isinstance(out, tuple) else (out,)
            idx = [o for o in out if torch.is_tensor(o) and not o.is_floating_point()][0]
            used.append("transformers router")
        except Exception:
            idx = own(mod, x)
            used.append("own noaux_tc")
        return idx.reshape(-1, cfg["num_experts_per_tok"]).sort(dim=-1).values

    changed = total = 0
    for mod, x in caught:
        a = chosen(mod, x)
        keep = mod.e_score_correction_bias.clone()
        mod.e_score_correction_bias.zero_()
        b = chosen(mod, x)
        mod.e_score_correction_bias.copy_(keep)
        changed += int((a != b).any(dim=-1).sum())
        total += a.shape[0]
    # group masking fill: with bias > 0 every score_for_choice is > 0
    neg = 0
    for mod, x in caught:
        s = torch.sigmoid(F.linear(x.reshape(-1, x.shape[-1]), mod.weight.float())) + mod.e_score_correction_bias
        neg += int((s <= 0).sum())
    print("  router selections computed with: %s" % sorted(set(used)))
    return changed / max(total, 1), total, neg


# ----------------------------------------------------------------------------


def seqs_for(cfg, seed):
    rs = np.random.RandomState(seed)
    return [torch.tensor(rs.randint(0, cfg["vocab_size"], size=n), dtype=torch.long) for n in SEQ_LENS]


def save_npy(path, a):
    a = np.ascontiguousarray(np.asarray(a, dtype="<f4"))
    with open(path, "wb") as f:
        np.lib.format.write_array(f, a, version=(1, 0), allow_pickle=False)


def build(out_root, name, cfg_fn, seed):
    from safetensors.torch import save_file
    cfg = cfg_fn()
    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(os.path.join(d, "ref"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    fp8 = "quantization_config" in cfg
    stored, vals = materialize(gen_weights(cfg, seed), fp8)

    # Reference model: built from the config as transformers parses it (minus
    # quantization: it holds the dequantized values in float32).
    with tempfile.TemporaryDirectory() as td:
        c2 = dict(cfg)
        c2.pop("quantization_config", None)
        with open(os.path.join(td, "config.json"), "w") as f:
            json.dump(c2, f)
        model = make_model(td)
    model.eval()
    layout = ASSUMED_LAYOUT
    sd, used = to_hf(vals, model.state_dict(), layout)
    model.load_state_dict(sd, strict=True)
    nL = cfg["num_hidden_layers"]
    unused = [k for k in vals if k not in used and not k.startswith("model.layers.%d." % nL)]
    if unused:
        raise RuntimeError("official tensors not used by the model: %s" % unused[:8])
    has_mtp = cfg.get("num_nextn_predict_layers", 0) > 0
    mtp = mtp_module(model, cfg, vals, layout) if has_mtp else None

    seqs = seqs_for(cfg, seed + 7)
    ref = {"generator": "tools/make_fixtures.py", "sequences": []}
    worst_manual = 0.0
    for i, ids in enumerate(seqs):
        s = {"name": "s%d" % i, "ids": ids.tolist(), "logits": "s%d.npy" % i}
        lg = logits_of(model, ids)
        worst_manual = max(worst_manual, float((manual_forward(model, ids) - lg).abs().max()))
        save_npy(os.path.join(d, "ref", s["logits"]), lg.numpy())
        if has_mtp and ids.numel() >= 2:
            ml, mh = mtp_forward(model, mtp, ids)
            s["mtp_logits"] = "s%d_mtp.npy" % i
            s["mtp_hidden"] = "s%d_mtp_hidden.npy" % i
            save_npy(os.path.join(d, "ref", s["mtp_logits"]), ml.numpy())
            save_npy(os.path.join(d, "ref", s["mtp_hidden"]), mh.numpy())
        if i in GREEDY:
            new, margins, loop = greedy(model, ids[:GREEDY[i]])
            if new != loop:
                print("  %s %s: generate %s != argmax loop %s" % (name, s["name"], new, loop))
            s["greedy"] = {"prompt_len": GREEDY[i], "ids": new, "margins": margins}
        ref["sequences"].append(s)
    print("%s: layer-by-layer forward vs model(): max |diff| %.3g" % (name, worst_manual))
    std = float(torch.cat([logits_of(model, x) for x in seqs]).std())
    print("%s: logit std %.3f" % (name, std))
    if cfg["topk_method"] == "noaux_tc":
        frac, tot, neg = router_bias_effect(model, cfg, seqs)
        print("%s: e_score_correction_bias changes the expert set of %.1f%% of %d (layer, token) pairs;"
              " scores_for_choice <= 0: %d" % (name, 100 * frac, tot, neg))
        ref["router_bias_changed_fraction"] = round(frac, 4)
    with open(os.path.join(d, "ref", "ref.json"), "w") as f:
        json.dump(ref, f)
        f.write("\n")
    save_file({k: v.contiguous() for k, v in stored.items()}, os.path.join(d, "model.safetensors"),
              metadata={"format": "pt"})


def learn_layout(model, off, cfg):
    """Which fused layout did transformers' own loader produce from the
    per-expert checkpoint?  Tries every candidate on the first MoE layer."""
    L = cfg["first_k_dense_replace"]
    sd = model.state_dict()
    p = "model.layers.%d.mlp.experts" % L
    keys = [k for k in sd if k.startswith(p + ".")]
    if any(re.match(re.escape(p) + r"\.\d+\.", k) for k in keys):
        return "per-expert (not fused)", ASSUMED_LAYOUT
    E = cfg["n_routed_experts"]
    found = {}
    for k in keys:
        which = EXPERT_RE.match(k).group(2)
        for lay in ({"gate_up": g, "gate_up_T": t, "down_T": t} for g in ("gate_first", "up_first")
                    for t in (False, True)):
            cand = fuse(off, p, which, E, lay)
            if cand.shape == sd[k].shape and torch.equal(cand, sd[k].float()):
                found.setdefault(which, []).append(lay)
    desc = {k: (tuple(sd[k].shape)) for k in keys}
    return "%s; matches %s" % (desc, found), found


def check(out_root, names):
    import transformers
    print("check: transformers %s, torch %s" % (transformers.__version__, torch.__version__))
    ok = True
    for name in names:
        d = os.path.join(out_root, name)
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(d, "ref", "ref.json")) as f:
            ref = json.load(f)
        off = load_official(d)
        td = None
        src = d
        if "quantization_config" in cfg:
            # transformers' fp8 path needs a GPU and quantizes activations, so
            # the exact check loads the dequantized weights (decoded by
            # load_official from F8_E4M3 * weight_scale_inv) unquantized.
            from safetensors.torch import save_file
            td = tempfile.mkdtemp()
            c2 = dict(cfg)
            c2.pop("quantization_config")
            with open(os.path.join(td, "config.json"), "w") as f:
                json.dump(c2, f)
            save_file({k: v.contiguous() for k, v in off.items()}, os.path.join(td, "model.safetensors"),
                      metadata={"format": "pt"})
            src = td
        model = make_model(src, from_pretrained=True)
        model.eval()
        desc, found = learn_layout(model, off, cfg)
        print("%s: transformers expert layout after from_pretrained: %s" % (name, desc))
        fused = [k for k in model.state_dict() if EXPERT_RE.match(k) and ".experts.%d." % 0 not in k]
        if fused and (not found or not all(ASSUMED_LAYOUT in v for v in found.values())):
            print("%s: LAYOUT DIFFERS from the assumed %s" % (name, ASSUMED_LAYOUT))
            ok = False
        b = [k for k in model.state_dict() if k.endswith("e_score_correction_bias")]
        if b:
            print("%s: loaded e_score_correction_bias nonzero: %s" % (
                name, all(bool(model.state_dict()[k].abs().sum() > 0) for k in b)))
        has_mtp = cfg.get("num_nextn_predict_layers", 0) > 0
        mtp = mtp_module(model, cfg, off, ASSUMED_LAYOUT) if has_mtp else None
        wl = wm = wh = 0.0
        gmis = 0
        for s in ref["sequences"]:
            ids = torch.tensor(s["ids"], dtype=torch.long)
            lg = logits_of(model, ids).numpy()
            wl = max(wl, float(np.abs(lg - np.load(os.path.join(d, "ref", s["logits"]))).max()))
            if "mtp_logits" in s:
                ml, mh = mtp_forward(model, mtp, ids)
                wm = max(wm, float(np.abs(ml.numpy() - np.load(os.path.join(d, "ref", s["mtp_logits"]))).max()))
                wh = max(wh, float(np.abs(mh.numpy() - np.load(os.path.join(d, "ref", s["mtp_hidden"]))).max()))
            if "greedy" in s:
                g = s["greedy"]
                new, margins, _ = greedy(model, ids[:g["prompt_len"]])
                gmis += sum(a != b for a, b in zip(new, g["ids"]))
                print("%s/%s greedy: %d tokens, min margin %.4f, mismatches %d" % (
                    name, s["name"], len(new), min(g["margins"]), sum(a != b for a, b in zip(new, g["ids"]))))
        print("%s: from_pretrained vs reference: max |logit diff| %.3g, MTP logits %.3g, MTP hidden %.3g" % (
            name, wl, wm, wh))
        ok = ok and wl < 1e-5 and wm < 1e-5 and gmis == 0
        if td:
            shutil.rmtree(td)
            check_fp8_native(d, ref)
    print("check: %s" % ("OK" if ok else "FAILED"))
    return ok


def check_fp8_native(d, ref):
    """Informative: transformers' own fp8 loader on the fp8 directory (GPU
    only).  With dequantize=True it decodes weight_scale_inv itself, which
    checks our scale convention independently; the default path quantizes
    activations (per 128-wide group), so only a loose agreement is expected."""
    if not torch.cuda.is_available():
        print("fp8 native: no GPU, skipped")
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from transformers import FineGrainedFP8Config
    for label, kw in (("dequantize=True", {"quantization_config": FineGrainedFP8Config(dequantize=True)}),
                      ("fp8 kernels", {})):
        try:
            m = make_model(d, from_pretrained=True, device_map="cuda", **kw)
            m.eval()
            w = 0.0
            with torch.no_grad():
                for s in ref["sequences"]:
                    ids = torch.tensor(s["ids"], dtype=torch.long, device="cuda")
                    lg = m(input_ids=ids[None]).logits[0].float().cpu().numpy()
                    w = max(w, float(np.abs(lg - np.load(os.path.join(d, "ref", s["logits"]))).max()))
            print("fp8 native (%s): max |logit diff| vs reference %.3g" % (label, w))
            del m
        except Exception as ex:  # informative only
            print("fp8 native (%s): failed: %s: %s" % (label, type(ex).__name__, str(ex)[:300]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--check", action="store_true", help="only re-check existing directories")
    ap.add_argument("--only", default=None, help="comma-separated subset of v3,v2lite,fp8")
    a = ap.parse_args()
    torch.manual_seed(0)
    names = [m[0] for m in MODELS if a.only is None or m[0] in a.only.split(",")]
    import transformers
    print("transformers %s, torch %s, numpy %s" % (transformers.__version__, torch.__version__, np.__version__))
    if not a.check:
        for name, fn, seed in MODELS:
            if name in names:
                build(a.out, name, fn, seed)
                sz = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(a.out, name))
                         for f in fs)
                print("%s: %.2f MB" % (name, sz / 1e6))
    sys.exit(0 if check(a.out, names) else 1)


if __name__ == "__main__":
    main()

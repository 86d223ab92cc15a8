#!/usr/bin/env python3
"""Train dsv3-tiny: the DeepSeek-V3 architecture at a small size, with its MTP module,
on the corpus of tools/fetch_tiny_data.sh, and export it in the official layout.

  tools/train_tiny.py prep-tok DSV3_TOKENIZER_DIR OUT.json
      (developer machine, no torch) keep the parts of DeepSeek-V3's tokenizer files
      that the tiny tokenizer reuses: pre-tokenizer, decoder, special tokens, chat template.
  tools/train_tiny.py train --data .gpu/train --out DIR [--budget-s 540] [--smoke]
      (GPU machine) tokenizer + tokenization + training + export + checks, all in one run.
  tools/train_tiny.py distill-mtp --model models/dsv3-tiny --data .gpu/train --out DIR
      (GPU machine) retrain the shipped MTP module as a draft of the frozen main model.

Model (plain PyTorch; the forward is transformers' DeepseekV3 math so that
from_pretrained reproduces the logits): MLA with q_lora, interleaved RoPE on the
rope part; MoE with sigmoid scores, e_score_correction_bias for selection only,
group-limited top-k (noaux_tc), normalized weights x routed_scaling_factor, one
shared expert; first layer dense. Balancing: the bias is nudged every step by
gamma * sign(mean load - load) (auxiliary-loss-free), plus the sequence-wise
balance loss with a small alpha. One MTP module: for position p,
x = eh_proj([enorm(embed(t[p+1])); hnorm(h[p])]) with h after the final norm,
one decoder block, logits = head(shared_head.norm(x)) predicting t[p+2];
its loss weight is lambda. During training the MTP module shares the main
embedding and output head; the export writes copies.

Training computes every routed expert for every token and multiplies the
intermediate by the (sparse, top-k) routing weights before the down projection:
the same function and the same gradients as dispatching tokens to their k
experts (unselected experts get weight 0, so exactly zero contribution and zero
gradient), without any data-dependent shapes. At 16 experts of width 96 that is
two dense GEMMs per MoE layer, faster here than a dispatch loop.
"""
import argparse
import json
import lzma
import math
import os
import sys
import time

SPECIALS = [  # id order of the tiny vocabulary; flags are copied from DeepSeek-V3's added_tokens
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
]
BOS, EOS, PAD = 0, 1, 2
NAME = "dsv3-tiny"

CFG = dict(
    vocab_size=8192, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
    num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=True,
    num_nextn_predict_layers=1, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=1024,
)


# --------------------------------------------------------------------------- prep-tok

def prep_tok(src, out):
    tj = json.load(open(os.path.join(src, "tokenizer.json"), encoding="utf-8"))
    tc = json.load(open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8"))
    by_content = {a["content"]: a for a in tj["added_tokens"]}
    missing = [s for s in SPECIALS if s not in by_content]
    if missing:
        sys.exit(f"not in {src}: {missing}")
    parts = {
        "normalizer": tj["normalizer"], "pre_tokenizer": tj["pre_tokenizer"],
        "post_processor": tj["post_processor"], "decoder": tj["decoder"],
        "model": {k: v for k, v in tj["model"].items() if k not in ("vocab", "merges")},
        "added_tokens": [by_content[s] for s in SPECIALS],
        "tokenizer_config": {k: v for k, v in tc.items() if k != "added_tokens_decoder"},
    }
    json.dump(parts, open(out, "w", encoding="utf-8"), ensure_ascii=False, indent=1)
    print(f"wrote {out}")


# --------------------------------------------------------------------------- helpers

T0 = time.time()
LOG = []


def log(*a):
    s = f"[{time.time() - T0:7.1f}s] " + " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def load_docs(path, limit_chars=None):
    docs, n = [], 0
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            docs.append(d)
            n += len(d["text"])
            if limit_chars and n >= limit_chars:
                break
    return docs


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(parts, texts, vocab_size):
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers
    skel = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": parts["normalizer"], "pre_tokenizer": parts["pre_tokenizer"],
        "post_processor": parts["post_processor"], "decoder": parts["decoder"],
        "model": dict(parts["model"], vocab={}, merges=[]),
    }
    tok = Tokenizer.from_str(json.dumps(skel))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    j = json.loads(tok.to_str())
    # DeepSeek-V3's file layout: its added-token flags, merges as "a b" strings
    # (byte-level symbols never contain a space), the model keys it has.
    flags = {a["content"]: a for a in parts["added_tokens"]}
    j["added_tokens"] = [dict(flags[a["content"]], id=a["id"]) for a in j["added_tokens"]]
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    j["model"] = dict(parts["model"], vocab=j["model"]["vocab"], merges=merges)
    for i, s in enumerate(SPECIALS):
        assert j["model"]["vocab"][s] == i and j["added_tokens"][i]["content"] == s, s
    text = json.dumps(j, ensure_ascii=False, indent=None)
    tok = Tokenizer.from_str(text)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok, text


def tokenizer_config(parts):
    tc = dict(parts["tokenizer_config"])
    tc["model_max_length"] = CFG["max_position_embeddings"]
    tc["pad_token"] = dict(tc["bos_token"], content=SPECIALS[PAD])
    return tc


def encode_docs(tok, docs):
    import numpy as np
    texts = [d["text"] for d in docs]
    enc = getattr(tok, "encode_batch_fast", tok.encode_batch)(texts, add_special_tokens=False)
    lens = [len(e.ids) for e in enc]
    out = np.empty(sum(lens) + 2 * len(lens), dtype=np.int32)
    i = 0
    for e, n in zip(enc, lens):  # each document: BOS text EOS
        out[i] = BOS
        out[i + 1:i + 1 + n] = e.ids
        out[i + 1 + n] = EOS
        i += n + 2
    return out


# --------------------------------------------------------------------------- model

def build_model_classes():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class RMSNorm(nn.Module):
        def __init__(self, n, eps):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))
            self.eps = eps

        def forward(self, x):  # transformers' DeepseekV3RMSNorm
            dt = x.dtype
            x = x.float()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * x.to(dt)

    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def rope_interleave(x, cos, sin):
        # transformers' apply_rotary_pos_emb_interleave: pairs (x[2i], x[2i+1]) rotate
        # by pos*inv_freq[i]; the result is laid out evens-then-odds (q and k alike).
        b, h, s, d = x.shape
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
        return x * cos + rotate_half(x) * sin

    class MLA(nn.Module):
        def __init__(self, c):
            super().__init__()
            H, nh = c["hidden_size"], c["num_attention_heads"]
            self.nh, self.nope, self.rope, self.v = nh, c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
            self.kv_lora = c["kv_lora_rank"]
            qk = self.nope + self.rope
            self.q_a_proj = nn.Linear(H, c["q_lora_rank"], bias=False)
            self.q_a_layernorm = RMSNorm(c["q_lora_rank"], 1e-6)
            self.q_b_proj = nn.Linear(c["q_lora_rank"], nh * qk, bias=False)
            self.kv_a_proj_with_mqa = nn.Linear(H, self.kv_lora + self.rope, bias=False)
            self.kv_a_layernorm = RMSNorm(self.kv_lora, 1e-6)
            self.kv_b_proj = nn.Linear(self.kv_lora, nh * (self.nope + self.v), bias=False)
            self.o_proj = nn.Linear(nh * self.v, H, bias=False)
            self.scale = qk ** -0.5

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, T, self.nh, -1).transpose(1, 2)
            q_nope, q_pe = torch.split(q, [self.nope, self.rope], dim=-1)
            ckv, k_pe = torch.split(self.kv_a_proj_with_mqa(x), [self.kv_lora, self.rope], dim=-1)
            kv = self.kv_b_proj(self.kv_a_layernorm(ckv)).view(B, T, self.nh, -1).transpose(1, 2)
            k_nope, v = torch.split(kv, [self.nope, self.v], dim=-1)
            k_pe = k_pe.reshape(B, 1, T, self.rope)
            q_pe = rope_interleave(q_pe, cos, sin)
            k_pe = rope_interleave(k_pe, cos, sin)
            q = torch.cat((q_nope, q_pe), dim=-1)
            k = torch.cat((k_nope, k_pe.expand(B, self.nh, T, self.rope)), dim=-1)
            pad = q.shape[-1] - self.v  # equal head dims let SDPA use its flash kernel
            vp = F.pad(v, (0, pad)) if pad > 0 else v
            o = F.scaled_dot_product_attention(q, k, vp, is_causal=True, scale=self.scale)[..., :self.v]
            return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.v))

    class MLP(nn.Module):
        def __init__(self, H, I):
            super().__init__()
            self.gate_proj = nn.Linear(H, I, bias=False)
            self.up_proj = nn.Linear(H, I, bias=False)
            self.down_proj = nn.Linear(I, H, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class MoE(nn.Module):
        def __init__(self, c):
            super().__init__()
            H, I, E = c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]
            self.H, self.I, self.E = H, I, E
            self.k, self.ng, self.kg = c["num_experts_per_tok"], c["n_group"], c["topk_group"]
            self.rsf = c["routed_scaling_factor"]
            self.gate_w = nn.Parameter(torch.empty(E, I, H))   # experts.e.gate_proj.weight
            self.up_w = nn.Parameter(torch.empty(E, I, H))     # experts.e.up_proj.weight
            self.down_w = nn.Parameter(torch.empty(E, H, I))   # experts.e.down_proj.weight
            self.router = nn.Parameter(torch.empty(E, H))      # gate.weight
            self.register_buffer("bias", torch.zeros(E))       # gate.e_score_correction_bias
            self.shared_experts = MLP(H, I * c["n_shared_experts"])

        def route(self, x):
            """x [N,H] -> scores [N,E] (float32, with grad), idx [N,k], weights [N,k]."""
            with torch.autocast("cuda", enabled=False):
                scores = torch.sigmoid(F.linear(x.float(), self.router.float()))
            with torch.no_grad():
                s = scores + self.bias
                N = s.shape[0]
                g = s.view(N, self.ng, -1).topk(2, dim=-1)[0].sum(-1)
                gidx = g.topk(self.kg, dim=-1)[1]
                gmask = torch.zeros_like(g).scatter_(1, gidx, 1.0)
                smask = gmask.unsqueeze(-1).expand(N, self.ng, self.E // self.ng).reshape(N, self.E)
                idx = s.masked_fill(smask == 0, float("-inf")).topk(self.k, dim=-1)[1]
            w = scores.gather(1, idx)
            w = w / (w.sum(-1, keepdim=True) + 1e-20) * self.rsf
            return scores, idx, w

        def forward(self, x):
            """x [B,T,H] -> y [B,T,H], balance-loss term (per sequence), load counts [E]."""
            B, T, H = x.shape
            xf = x.reshape(-1, H)
            scores, idx, w = self.route(xf)
            dense_w = torch.zeros_like(scores).scatter(1, idx, w)            # [N,E], k nonzeros per row
            gu = F.linear(xf, torch.cat((self.gate_w, self.up_w), 1).reshape(-1, H))  # [N, E*2I]
            gu = gu.view(-1, self.E, 2 * self.I)
            a = F.silu(gu[..., :self.I]) * gu[..., self.I:]                 # [N,E,I]
            a = a * dense_w.unsqueeze(-1).to(a.dtype)
            y = F.linear(a.reshape(-1, self.E * self.I), self.down_w.permute(1, 0, 2).reshape(H, -1))
            y = y.view(B, T, H) + self.shared_experts(x)
            with torch.no_grad():
                onehot = torch.zeros_like(scores).scatter_(1, idx, 1.0)    # [N,E]
                load = onehot.sum(0)
                f = onehot.view(B, T, self.E).sum(1) * (self.E / (self.k * T))  # [B,E]
            p = (scores / scores.sum(-1, keepdim=True)).view(B, T, self.E).mean(1)
            bal = (f * p).sum(-1).mean()
            return y, bal, load

    class Block(nn.Module):
        def __init__(self, c, dense):
            super().__init__()
            H = c["hidden_size"]
            self.input_layernorm = RMSNorm(H, c["rms_norm_eps"])
            self.self_attn = MLA(c)
            self.post_attention_layernorm = RMSNorm(H, c["rms_norm_eps"])
            self.dense = dense
            self.mlp = MLP(H, c["intermediate_size"]) if dense else MoE(c)

        def forward(self, x, cos, sin):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            h = self.post_attention_layernorm(x)
            if self.dense:
                return x + self.mlp(h), None, None
            y, bal, load = self.mlp(h)
            return x + y, bal, load

    class TinyV3(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c
            H, V = c["hidden_size"], c["vocab_size"]
            self.embed_tokens = nn.Embedding(V, H)
            self.layers = nn.ModuleList(
                [Block(c, i < c["first_k_dense_replace"]) for i in range(c["num_hidden_layers"])])
            self.norm = RMSNorm(H, c["rms_norm_eps"])
            self.lm_head = nn.Linear(H, V, bias=False)
            # MTP module (depth 1); embedding and head shared with the main model.
            self.enorm = RMSNorm(H, c["rms_norm_eps"])
            self.hnorm = RMSNorm(H, c["rms_norm_eps"])
            self.eh_proj = nn.Linear(2 * H, H, bias=False)
            self.mtp_block = Block(c, False)
            self.mtp_norm = RMSNorm(H, c["rms_norm_eps"])
            d = c["qk_rope_head_dim"]
            inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
            self.register_buffer("inv_freq", inv, persistent=False)

        def moe_layers(self):
            return [b.mlp for b in list(self.layers) + [self.mtp_block] if not b.dense]

        def rope(self, T, device):
            pos = torch.arange(T, device=device, dtype=torch.float32)
            f = torch.outer(pos, self.inv_freq.float())
            emb = torch.cat((f, f), dim=-1)
            return emb.cos()[None, None], emb.sin()[None, None]

        def forward(self, ids, next_ids=None):
            """ids [B,T] -> main logits [B,T,V], MTP logits [B,T,V] (if next_ids, the
            tokens at p+1), sum of balance terms, loads [n_moe, E]."""
            B, T = ids.shape
            cos, sin = self.rope(T, ids.device)
            x = self.embed_tokens(ids)
            bals, loads = [], []
            for blk in self.layers:
                x, bal, load = blk(x, cos, sin)
                if bal is not None:
                    bals.append(bal)
                    loads.append(load)
            h = self.norm(x)
            logits = self.lm_head(h)
            mtp_logits = None
            if next_ids is not None:
                mtp_logits, bal, load = self.mtp(h, next_ids, cos, sin)
                bals.append(bal)
                loads.append(load)
            return logits, mtp_logits, torch.stack(bals).sum(), torch.stack(loads), h

        def mtp(self, h, next_ids, cos=None, sin=None):
            """h [B,T,H] after the final norm, next_ids [B,T] (tokens at p+1) -> MTP logits
            [B,T,V] predicting p+2, balance term, load [E]."""
            if cos is None:
                cos, sin = self.rope(h.shape[1], h.device)
            e = self.embed_tokens(next_ids)
            m = self.eh_proj(torch.cat((self.enorm(e), self.hnorm(h)), dim=-1))
            m, bal, load = self.mtp_block(m, cos, sin)
            return self.lm_head(self.mtp_norm(m)), bal, load

        def mtp_params(self):
            """What the MTP module trains on its own (embedding and head are the main model's)."""
            return [p for mod in (self.enorm, self.hnorm, self.eh_proj, self.mtp_block, self.mtp_norm)
                    for p in mod.parameters()]

    def init_weights(model, std=0.02):
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
        return model

    return TinyV3, init_weights


# --------------------------------------------------------------------------- export

def mtp_index():
    return CFG["num_hidden_layers"]


def export_state(model):
    """The official DeepSeek names -> tensors (float32, on CPU)."""
    sd = {}
    g = lambda t: t.detach().float().cpu().contiguous()

    def block(prefix, b):
        sd[prefix + "input_layernorm.weight"] = g(b.input_layernorm.weight)
        sd[prefix + "post_attention_layernorm.weight"] = g(b.post_attention_layernorm.weight)
        a = b.self_attn
        for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            sd[f"{prefix}self_attn.{n}.weight"] = g(getattr(a, n).weight)
        for n in ("q_a_layernorm", "kv_a_layernorm"):
            sd[f"{prefix}self_attn.{n}.weight"] = g(getattr(a, n).weight)
        if b.dense:
            for n in ("gate_proj", "up_proj", "down_proj"):
                sd[f"{prefix}mlp.{n}.weight"] = g(getattr(b.mlp, n).weight)
        else:
            m = b.mlp
            sd[prefix + "mlp.gate.weight"] = g(m.router)
            sd[prefix + "mlp.gate.e_score_correction_bias"] = g(m.bias)
            for e in range(m.E):
                sd[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = g(m.gate_w[e])
                sd[f"{prefix}mlp.experts.{e}.up_proj.weight"] = g(m.up_w[e])
                sd[f"{prefix}mlp.experts.{e}.down_proj.weight"] = g(m.down_w[e])
            for n in ("gate_proj", "up_proj", "down_proj"):
                sd[f"{prefix}mlp.shared_experts.{n}.weight"] = g(getattr(m.shared_experts, n).weight)

    sd["model.embed_tokens.weight"] = g(model.embed_tokens.weight)
    for i, b in enumerate(model.layers):
        block(f"model.layers.{i}.", b)
    sd["model.norm.weight"] = g(model.norm.weight)
    sd["lm_head.weight"] = g(model.lm_head.weight)
    p = f"model.layers.{mtp_index()}."
    block(p, model.mtp_block)
    sd[p + "embed_tokens.weight"] = g(model.embed_tokens.weight)
    sd[p + "enorm.weight"] = g(model.enorm.weight)
    sd[p + "hnorm.weight"] = g(model.hnorm.weight)
    sd[p + "eh_proj.weight"] = g(model.eh_proj.weight)
    sd[p + "shared_head.norm.weight"] = g(model.mtp_norm.weight)
    sd[p + "shared_head.head.weight"] = g(model.lm_head.weight)
    return sd


def import_state(model, sd):
    """Inverse of export_state (used to run the training code on exported weights)."""
    import torch
    with torch.no_grad():
        def cp(dst, name):
            dst.copy_(sd[name].to(dst.dtype))

        def block(prefix, b):
            cp(b.input_layernorm.weight, prefix + "input_layernorm.weight")
            cp(b.post_attention_layernorm.weight, prefix + "post_attention_layernorm.weight")
            a = b.self_attn
            for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                      "q_a_layernorm", "kv_a_layernorm"):
                cp(getattr(a, n).weight, f"{prefix}self_attn.{n}.weight")
            if b.dense:
                for n in ("gate_proj", "up_proj", "down_proj"):
                    cp(getattr(b.mlp, n).weight, f"{prefix}mlp.{n}.weight")
            else:
                m = b.mlp
                cp(m.router, prefix + "mlp.gate.weight")
                cp(m.bias, prefix + "mlp.gate.e_score_correction_bias")
                for e in range(m.E):
                    cp(m.gate_w[e], f"{prefix}mlp.experts.{e}.gate_proj.weight")
                    cp(m.up_w[e], f"{prefix}mlp.experts.{e}.up_proj.weight")
                    cp(m.down_w[e], f"{prefix}mlp.experts.{e}.down_proj.weight")
                for n in ("gate_proj", "up_proj", "down_proj"):
                    cp(getattr(m.shared_experts, n).weight, f"{prefix}mlp.shared_experts.{n}.weight")

        cp(model.embed_tokens.weight, "model.embed_tokens.weight")
        for i, b in enumerate(model.layers):
            block(f"model.layers.{i}.", b)
        cp(model.norm.weight, "model.norm.weight")
        cp(model.lm_head.weight, "lm_head.weight")
        p = f"model.layers.{mtp_index()}."
        block(p, model.mtp_block)
        cp(model.enorm.weight, p + "enorm.weight")
        cp(model.hnorm.weight, p + "hnorm.weight")
        cp(model.eh_proj.weight, p + "eh_proj.weight")
        cp(model.mtp_norm.weight, p + "shared_head.norm.weight")


def is_fp8_weight(name, t):
    """2-D linear weights go to FP8; embeddings, heads, norms and the router stay BF16."""
    if t.dim() != 2 or not name.endswith(".weight"):
        return False
    return not (name.endswith("embed_tokens.weight") or name == "lm_head.weight"
                or name.endswith("shared_head.head.weight") or name.endswith("mlp.gate.weight"))


def quant_fp8(w):
    """[r,c] float32 -> (e4m3 [r,c], float32 scale_inv [ceil(r/128), ceil(c/128)]); w ~= q * scale."""
    import torch
    r, c = w.shape
    R, C = -(-r // 128), -(-c // 128)
    p = torch.zeros(R * 128, C * 128, dtype=torch.float32)
    p[:r, :c] = w
    blk = p.view(R, 128, C, 128)
    amax = blk.abs().amax(dim=(1, 3))
    scale = (amax / 448.0).clamp(min=1e-12)
    q = (blk / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(R * 128, C * 128)[:r, :c].contiguous(), scale.float().contiguous()


def dequant_fp8(q, s):
    import torch
    r, c = q.shape
    R, C = s.shape
    full = torch.zeros(R * 128, C * 128, dtype=torch.float32)
    full[:r, :c] = q.float()
    return (full.view(R, 128, C, 128) * s[:, None, :, None]).view(R * 128, C * 128)[:r, :c].contiguous()


def write_model_dir(d, sd32, fp8, tok_text, tok_cfg):
    import torch
    from safetensors.torch import save_file
    os.makedirs(d, exist_ok=True)
    out = {}
    for n, t in sd32.items():
        if n.endswith("e_score_correction_bias"):
            out[n] = t.float().contiguous()
        elif fp8 and is_fp8_weight(n, t):
            q, s = quant_fp8(t)
            out[n] = q
            out[n + "_scale_inv"] = s
        else:
            out[n] = t.to(torch.bfloat16).contiguous()
    save_file(out, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
           "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
           "initializer_range": 0.02, "bos_token_id": BOS, "eos_token_id": EOS,
           "ep_size": 1, "num_key_value_heads": CFG["num_key_value_heads"]}
    cfg.update({k: v for k, v in CFG.items()})
    cfg.update({"topk_method": "noaux_tc", "scoring_func": "sigmoid", "rope_scaling": None,
                "rope_interleave": True, "tie_word_embeddings": False, "use_cache": True,
                "torch_dtype": "bfloat16"})
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=2)
    json.dump({"_from_model_config": True, "bos_token_id": BOS, "eos_token_id": EOS, "do_sample": True,
               "temperature": 0.6, "top_p": 0.95}, open(os.path.join(d, "generation_config.json"), "w"), indent=2)
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok_text)
    json.dump(tok_cfg, open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8"),
              ensure_ascii=False, indent=2)
    return out


# --------------------------------------------------------------------------- train

def train(args):
    import numpy as np
    import torch
    import torch.nn.functional as F

    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    torch.manual_seed(1234)
    np.random.seed(1234)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    metrics = {"config": CFG, "args": vars(args), "device": torch.cuda.get_device_name(0),
               "torch": torch.__version__}

    # ---- data + tokenizer
    parts = json.load(open(os.path.join(args.data, "dsv3_tok_parts.json"), encoding="utf-8"))
    lim = 4e6 if args.smoke else None
    train_docs = load_docs(os.path.join(args.data, "train.jsonl.xz"), lim)
    val_docs = load_docs(os.path.join(args.data, "val.jsonl.xz"), 4e5 if args.smoke else None)
    log(f"docs: train {len(train_docs)} ({sum(len(d['text']) for d in train_docs) / 1e6:.1f} MB), "
        f"val {len(val_docs)} ({sum(len(d['text']) for d in val_docs) / 1e6:.2f} MB)")
    import tokenizers
    tok_texts = [d["text"] for i, d in enumerate(train_docs) if i % 2 == 0]  # half the corpus is plenty for merges
    tok, tok_text = train_tokenizer(parts, tok_texts, CFG["vocab_size"])
    tok_cfg = tokenizer_config(parts)
    log(f"tokenizer trained (tokenizers {tokenizers.__version__}): vocab {tok.get_vocab_size()}")
    tr = encode_docs(tok, train_docs)
    va = encode_docs(tok, val_docs)
    chars = sum(len(d["text"]) for d in train_docs)
    log(f"tokens: train {len(tr)} ({chars / len(tr):.2f} chars/token), val {len(va)}")
    metrics["tokens"] = {"train": int(len(tr)), "val": int(len(va)), "chars_per_token": chars / len(tr)}
    tr_g = torch.from_numpy(tr.astype(np.int64)).to(dev)
    va_g = torch.from_numpy(va.astype(np.int64)).to(dev)

    # ---- model
    TinyV3, init_weights = build_model_classes()
    model = init_weights(TinyV3(CFG)).to(dev)
    n_distinct = sum(p.numel() for p in model.parameters())
    V, H = CFG["vocab_size"], CFG["hidden_size"]
    n_stored = n_distinct + 2 * V * H  # + the MTP layer's copies of embedding and head
    n_active = n_distinct - sum(m.gate_w.numel() + m.up_w.numel() + m.down_w.numel() for m in model.moe_layers()) \
        * (1 - CFG["num_experts_per_tok"] / CFG["n_routed_experts"])
    metrics["params"] = {"distinct": n_distinct, "stored_per_copy": n_stored, "active_per_token": int(n_active)}
    log(f"params: distinct {n_distinct:,}  stored per copy {n_stored:,}  active/token {int(n_active):,}")

    T, B = args.seq, args.batch
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)

    def loss_fn(seq):
        ids, nxt = seq[:, :T], seq[:, 1:T + 1]
        logits, mtp_logits, bal, loads, _ = model(ids, nxt)
        l_main = F.cross_entropy(logits.float().view(-1, V), seq[:, 1:T + 1].reshape(-1))
        l_mtp = F.cross_entropy(mtp_logits.float().view(-1, V), seq[:, 2:T + 2].reshape(-1))
        return l_main + args.mtp_lambda * l_mtp + args.alpha * bal, l_main, l_mtp, loads

    step_fn = loss_fn
    if args.compile:
        step_fn = torch.compile(loss_fn)
    moe = model.moe_layers()

    def batch():
        st = torch.randint(0, len(tr_g) - T - 2, (B,), device=dev)
        return tr_g[st[:, None] + torch.arange(T + 2, device=dev)]

    @torch.no_grad()
    def evaluate(max_windows=None, fp32=False):
        model.eval()
        n = (len(va_g) - 2) // T
        if max_windows:
            n = min(n, max_windows)
        tot = {"main": 0.0, "mtp": 0.0, "mtp_acc": 0.0, "mtp_agree": 0.0, "main_acc": 0.0}
        n_agree = 0
        loads = torch.zeros(len(moe), CFG["n_routed_experts"], device=dev)
        cnt = 0
        eb = 16
        for i0 in range(0, n, eb):
            idx = torch.arange(i0, min(n, i0 + eb), device=dev)
            seq = va_g[idx[:, None] * T + torch.arange(T + 2, device=dev)]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not fp32):
                logits, ml, _, ld, _ = model(seq[:, :T], seq[:, 1:T + 1])
            logits, ml = logits.float(), ml.float()
            k = seq.shape[0] * T
            tot["main"] += F.cross_entropy(logits.view(-1, V), seq[:, 1:T + 1].reshape(-1), reduction="sum").item()
            tot["mtp"] += F.cross_entropy(ml.view(-1, V), seq[:, 2:T + 2].reshape(-1), reduction="sum").item()
            tot["main_acc"] += (logits.argmax(-1) == seq[:, 1:T + 1]).sum().item()
            mp = ml.argmax(-1)
            tot["mtp_acc"] += (mp == seq[:, 2:T + 2]).sum().item()
            # greedy speculative acceptance: the draft for p+2 equals the main model's
            # own greedy choice there (given the true token at p+1)
            tot["mtp_agree"] += (mp[:, :-1] == logits.argmax(-1)[:, 1:]).sum().item()
            n_agree += seq.shape[0] * (T - 1)
            loads += ld
            cnt += k
        model.train()
        r = {k: v / cnt for k, v in tot.items()}
        r["mtp_agree"] = tot["mtp_agree"] / n_agree
        r["main_ppl"] = math.exp(r["main"])
        r["tokens"] = cnt
        r["load_max_over_mean"] = (loads.max(1).values / loads.mean(1)).tolist()
        r["load_min_over_mean"] = (loads.min(1).values / loads.mean(1)).tolist()
        r["loads"] = loads.long().tolist()
        return r

    # ---- loop: the schedule runs on wall time so the run ends inside the device call
    budget = args.budget_s - (time.time() - T0) - args.reserve_s
    log(f"training for {budget:.0f} s: batch {B} x {T} tokens, lr {args.lr}, lambda {args.mtp_lambda}, "
        f"alpha {args.alpha}, gamma {args.gamma}, compile {args.compile}")
    model.train()
    t_start = time.time()
    step, seen = 0, 0
    best = None
    hist = []
    warm = 0.04
    compile_s = None
    t_last = time.time()
    while True:
        el = time.time() - t_start
        frac = el / budget
        if frac >= 1.0:
            break
        lr = args.lr * (frac / warm if frac < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (frac - warm) / (1 - warm))))
        for gp in opt.param_groups:
            gp["lr"] = lr
        seq = batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, l_main, l_mtp, loads = step_fn(seq)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free balancing; shift keeps min(bias)=0 (see README)
            for m, ld in zip(moe, loads):
                m.bias += args.gamma * torch.sign(ld.mean() - ld)
                m.bias -= m.bias.min()
        step += 1
        seen += B * T
        if step == 1:  # the schedule's clock starts after compilation
            torch.cuda.synchronize()
            compile_s = time.time() - t_start
            budget -= compile_s
            t_start = t_last = time.time()
            log(f"first step done in {compile_s:.1f} s (compile); {budget:.0f} s left for training")
        if step % args.log_every == 0:
            lm, lt = l_main.item(), l_mtp.item()
            now = time.time()
            tps = args.log_every * B * T / (now - t_last)
            t_last = now
            lmax = (loads.max(1).values / loads.float().mean(1)).max().item()
            log(f"step {step} lr {lr:.2e} loss {lm:.4f} mtp {lt:.4f} gnorm {gn.item():.2f} "
                f"load max/mean {lmax:.2f} {tps / 1e3:.0f}k tok/s")
            hist.append({"step": step, "t": round(time.time() - t_start, 1), "loss": lm, "mtp": lt})
        if step % args.eval_every == 0:
            ev = evaluate(max_windows=64)
            log(f"  val loss {ev['main']:.4f} (ppl {ev['main_ppl']:.1f}) mtp {ev['mtp']:.4f} "
                f"mtp acc {ev['mtp_acc']:.3f}")
            hist.append({"step": step, "t": round(time.time() - t_start, 1), "val": ev["main"],
                         "val_mtp_acc": ev["mtp_acc"]})
            if best is None or ev["main"] < best[0]:
                best = (ev["main"], step, {k: v.detach().clone() for k, v in model.state_dict().items()})
    train_s = time.time() - t_start
    log(f"trained {step} steps, {seen / 1e6:.1f} M tokens ({seen / len(tr):.1f} epochs) in {train_s:.0f} s")
    ev_last = evaluate(max_windows=64)
    if best is not None and best[0] < ev_last["main"]:
        log(f"restoring the best checkpoint (step {best[1]}, val {best[0]:.4f} < last {ev_last['main']:.4f})")
        model.load_state_dict(best[2])
    metrics["train"] = {"steps": step, "tokens_seen": seen, "epochs": seen / len(tr), "seconds": train_s,
                        "first_step_s": compile_s, "batch": B, "seq": T, "history": hist}

    # ---- export (weights rounded to bf16 are what the training code is checked with)
    sd32 = export_state(model)
    root = os.path.join(args.out, NAME)
    bf_dir, f8_dir = os.path.join(root, "bf16"), os.path.join(root, "fp8")
    write_model_dir(bf_dir, sd32, False, tok_text, tok_cfg)
    f8 = write_model_dir(f8_dir, sd32, True, tok_text, tok_cfg)
    sd_bf = {k: (v if k.endswith("bias") else v.to(torch.bfloat16).float()) for k, v in sd32.items()}
    import_state(model, {k: v.to(dev) for k, v in sd_bf.items()})
    model.float()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ev = evaluate(fp32=True)
    log(f"VAL (bf16 weights, fp32 math, {ev['tokens']} tokens): loss {ev['main']:.4f} ppl {ev['main_ppl']:.2f} "
        f"top1 {ev['main_acc']:.3f} | MTP loss {ev['mtp']:.4f} top1(t+2) {ev['mtp_acc']:.3f} "
        f"agree-with-main-greedy {ev['mtp_agree']:.3f}")
    log("expert load max/mean per MoE layer (last = MTP): " + " ".join(f"{x:.2f}" for x in ev["load_max_over_mean"]))
    log("expert load min/mean per MoE layer (last = MTP): " + " ".join(f"{x:.2f}" for x in ev["load_min_over_mean"]))
    metrics["val_bf16"] = ev
    # FP8 copy through the same code: dequantized weights
    sd_f8 = {}
    for n, t in f8.items():
        if n.endswith("_scale_inv"):
            continue
        sd_f8[n] = dequant_fp8(t, f8[n + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t.float()
    import_state(model, {k: v.to(dev) for k, v in sd_f8.items()})
    ev8 = evaluate(fp32=True)
    log(f"VAL (fp8 copy, dequantized): loss {ev8['main']:.4f} ppl {ev8['main_ppl']:.2f} | MTP top1 {ev8['mtp_acc']:.3f}")
    metrics["val_fp8"] = {k: ev8[k] for k in ("main", "main_ppl", "main_acc", "mtp", "mtp_acc", "mtp_agree")}
    import_state(model, {k: v.to(dev) for k, v in sd_bf.items()})
    model.eval()

    # ---- reference for the C engine + from_pretrained check
    ref_dir = os.path.join(root, "ref")
    os.makedirs(ref_dir, exist_ok=True)
    refs = ["The President said that the Congress", "In the beginning God created the heavens and the earth."]
    seqs = []
    for s, vd in zip(refs, val_docs[:2]):
        ids = [BOS] + tok.encode(s + " " + vd["text"][:400], add_special_tokens=False).ids
        seqs.append(ids[:32])
    ref, lg, ml = top20_ref(model, seqs, dev, "bf16")
    ref["text"] = [tok.decode(s) for s in seqs]
    json.dump(ref, open(os.path.join(ref_dir, "ref.json"), "w", encoding="utf-8"), ensure_ascii=False)
    import_state(model, {k: v.to(dev) for k, v in sd_f8.items()})
    json.dump(top20_ref(model, seqs, dev, "fp8")[0], open(os.path.join(ref_dir, "ref_fp8.json"), "w"))
    import_state(model, {k: v.to(dev) for k, v in sd_bf.items()})
    np.save(os.path.join(ref_dir, "main_logits_seq0_pos0-7.npy"), lg[0, :8].float().cpu().numpy())
    np.save(os.path.join(ref_dir, "mtp_logits_seq0_pos0-7.npy"), ml[0, :8].float().cpu().numpy())
    np.save(os.path.join(ref_dir, "tokens_seq0.npy"), np.array(seqs[0], dtype=np.int32))

    metrics["checks"] = hf_checks(bf_dir, model, tok, seqs, dev)

    # ---- sizes
    sizes = {}
    for dp, _, fs in os.walk(root):
        for f in fs:
            sizes[os.path.relpath(os.path.join(dp, f), root)] = os.path.getsize(os.path.join(dp, f))
    metrics["sizes"] = sizes
    metrics["total_bytes"] = sum(sizes.values())
    log(f"models/{NAME}: {metrics['total_bytes'] / 1e6:.2f} MB in all")
    metrics["log"] = LOG
    json.dump(metrics, open(os.path.join(args.out, "metrics.json"), "w"), indent=1)
    log("done")


def top20_ref(model, seqs, dev, which):
    """Top-20 ids and float32 logits per position, main model and MTP module."""
    import torch
    ids = torch.tensor(seqs, device=dev)
    with torch.no_grad():
        lg, ml, _, _, _ = model(ids, torch.cat((ids[:, 1:], ids[:, :1]), 1))
    ref = {"note": f"float32 logits of tools/train_tiny.py on the {which} copy's weights"
                   f"{' (dequantized)' if which == 'fp8' else ''}; mtp[p] predicts token p+2 "
                   "from h[p] and token p+1 (defined for p < len-1)",
           "sequences": seqs, "main_top20": [], "mtp_top20": []}
    for b in range(len(seqs)):
        v, i = lg[b].topk(20, -1)
        ref["main_top20"].append([{"ids": i[p].tolist(), "logits": [round(x, 5) for x in v[p].tolist()]}
                                  for p in range(len(seqs[b]))])
        v, i = ml[b, :-1].topk(20, -1)
        ref["mtp_top20"].append([{"ids": i[p].tolist(), "logits": [round(x, 5) for x in v[p].tolist()]}
                                 for p in range(len(seqs[b]) - 1)])
    return ref, lg, ml


def load_dir_state(d):
    """A model folder's safetensors -> float32 tensors under the export names (FP8 dequantized)."""
    import torch
    from safetensors.torch import load_file
    t = load_file(os.path.join(d, "model.safetensors"))
    out = {}
    for n, v in t.items():
        if n.endswith("_scale_inv"):
            continue
        out[n] = dequant_fp8(v, t[n + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v.float()
    return out


def make_ref(args):
    """Recompute ref/ from the shipped folders: check ref.json, write ref_fp8.json."""
    import torch
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    TinyV3, _ = build_model_classes()
    model = TinyV3(CFG).to(dev).eval()
    ref_dir = os.path.join(args.model, "ref")
    old = json.load(open(os.path.join(ref_dir, "ref.json"), encoding="utf-8"))
    seqs = old["sequences"]
    res = {}
    for which in ("bf16", "fp8"):
        import_state(model, {k: v.to(dev) for k, v in load_dir_state(os.path.join(args.model, which)).items()})
        ref = top20_ref(model, seqs, dev, which)[0]
        for key in ("main_top20", "mtp_top20"):
            d = max(abs(a - b) for so, sn in zip(old[key], ref[key]) for po, pn in zip(so, sn)
                    for a, b in zip(po["logits"], pn["logits"]))
            same = sum(po["ids"][0] == pn["ids"][0] for so, sn in zip(old[key], ref[key]) for po, pn in zip(so, sn))
            n = sum(len(x) for x in old[key])
            res[f"{which}_{key}_vs_ref_json"] = {"max_abs_diff_top20_values": d, "argmax_same": f"{same}/{n}"}
            print(f"{which} {key}: vs ref.json max|diff| of top-20 values {d:.3g}, argmax same {same}/{n}")
        ref["text"] = old.get("text")
        if which == "fp8":
            json.dump(ref, open(os.path.join(args.out, "ref_fp8.json"), "w", encoding="utf-8"), ensure_ascii=False)
        elif args.write:  # after a change of weights (distill-mtp): the new ref.json and MTP rows
            json.dump(ref, open(os.path.join(args.out, "ref.json"), "w", encoding="utf-8"), ensure_ascii=False)
            import numpy as np
            ids = torch.tensor(seqs, device=dev)
            with torch.no_grad():
                lg, ml, _, _, h = model(ids, torch.cat((ids[:, 1:], ids[:, :1]), 1))
            np.save(os.path.join(args.out, "main_logits_seq0_pos0-7.npy"), lg[0, :8].float().cpu().numpy())
            np.save(os.path.join(args.out, "mtp_logits_seq0_pos0-7.npy"), ml[0, :8].float().cpu().numpy())
            try:
                from transformers import AutoModelForCausalLM
                bf = os.path.join(args.model, "bf16")
                hf = AutoModelForCausalLM.from_pretrained(bf, dtype=torch.float32, attn_implementation="eager")
                hf = hf.to(dev).eval()
                with torch.no_grad():
                    out = hf(ids)
                    hN = hf.model(ids).last_hidden_state
                res["hf_main_logits_max_abs_diff"] = (out.logits - lg).abs().max().item()
                print(f"transformers main logits vs training code: max|diff| {res['hf_main_logits_max_abs_diff']:.3g}")
                res.update(hf_mtp_check(bf, ids, h, ml, hN, dev))
                print(f"transformers' decoder layer as the MTP module vs training code: max|diff| "
                      f"{res['mtp_logits_max_abs_diff']:.3g}")
            except Exception:
                import traceback
                res["hf_error"] = traceback.format_exc()
                print(res["hf_error"])
    json.dump(res, open(os.path.join(args.out, "ref_check.json"), "w"), indent=1)


def hf_checks(bf_dir, model, tok, seqs, dev):
    """transformers reproduces the main logits; its decoder block reproduces the MTP
    module; AutoTokenizer gives BOS + our ids; a short greedy generation."""
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    res = {"transformers": transformers.__version__}
    ids = torch.tensor(seqs, device=dev)
    with torch.no_grad():
        lg, ml, _, _, h = model(ids, torch.cat((ids[:, 1:], ids[:, :1]), 1))
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(bf_dir, dtype=torch.float32, attn_implementation="eager",
                                                        output_loading_info=True)
        hf = hf.to(dev).eval()
        res["missing_keys"] = sorted(info.get("missing_keys", []))
        res["unexpected_keys_n"] = len(info.get("unexpected_keys", []))
        with torch.no_grad():
            out = hf(ids)
            hN = hf.model(ids).last_hidden_state  # after model.norm
        d = (out.logits - lg).abs().max().item()
        res["main_logits_max_abs_diff"] = d
        res["main_logits_max_abs"] = lg.abs().max().item()
        log(f"CHECK from_pretrained(float32, eager) vs training code: main logits max|diff| {d:.3e} "
            f"(max|logit| {lg.abs().max().item():.2f}); missing {res['missing_keys']} "
            f"unexpected {res['unexpected_keys_n']} (the MTP layer)")
        res.update(hf_mtp_check(bf_dir, ids, h, ml, hN, dev))
        # greedy generations through transformers (PyTorch; the README's are from dsd)
        gens = []
        for p in ["The President said that", "In the beginning", "Knowledge is"]:
            x = torch.tensor([[0] + tok.encode(p, add_special_tokens=False).ids], device=dev)
            with torch.no_grad():
                g = hf.generate(x, max_new_tokens=40, do_sample=False)
            gens.append(tok.decode(g[0].tolist()[1:]))
        res["hf_greedy"] = gens
        for s in gens:
            log("GEN(hf greedy): " + s.replace("\n", " / "))
        del hf
    except Exception as e:  # report, do not lose the trained model
        import traceback
        res["hf_error"] = traceback.format_exc()
        log("CHECK from_pretrained FAILED: " + traceback.format_exc())
    # tokenizer through AutoTokenizer: which tokenizer_class reproduces BOS + raw ids
    samples = ["Hello, world!", "The year 1776 was   important.\n\nNew paragraph.", "naïve café — ünïcode",
               "<｜User｜>Hi<｜Assistant｜>", "   leading spaces and 12345 digits"]
    from tokenizers import Tokenizer

    def auto_vs_raw(d, raw, label):
        at = AutoTokenizer.from_pretrained(d)
        bad = []
        for s in samples:
            a, r = at(s)["input_ids"], [BOS] + raw.encode(s, add_special_tokens=False).ids
            if a != r:
                bad.append({"text": s, "auto": a[:24], "bos+raw": r[:24]})
        chat = at.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        log(f"CHECK AutoTokenizer ({label}, {type(at).__name__}): {len(samples) - len(bad)}/{len(samples)} samples "
            f"give BOS + tokenizers ids; chat render {chat!r}")
        for b in bad[:3]:
            log(f"   {b}")
        return {"ok": not bad, "mismatches": bad, "chat_render": chat, "class": type(at).__name__}

    cfg_paths = [os.path.join(x, "tokenizer_config.json") for x in (bf_dir, bf_dir.replace("/bf16", "/fp8"))]
    res["tokenizer_class_ok"] = None
    real = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".gpu", "train", "dsv3_real")
    try:
        if os.path.exists(os.path.join(real, "tokenizer.json")):
            res["autotokenizer_real_dsv3"] = auto_vs_raw(real, Tokenizer.from_file(os.path.join(real, "tokenizer.json")),
                                                         "real DeepSeek-V3")
    except Exception as e:
        log(f"CHECK AutoTokenizer on the real DeepSeek-V3 tokenizer failed: {e!r}")
    for cls in ("LlamaTokenizerFast", "PreTrainedTokenizerFast"):
        try:
            for cp in cfg_paths:
                tc = json.load(open(cp, encoding="utf-8"))
                tc["tokenizer_class"] = cls
                json.dump(tc, open(cp, "w", encoding="utf-8"), ensure_ascii=False, indent=2)
            r = auto_vs_raw(bf_dir, tok, cls)
            res.setdefault("autotokenizer", {})[cls] = r
            if r["ok"]:
                res["tokenizer_class_ok"] = cls
                break
        except Exception as e:
            log(f"CHECK AutoTokenizer with {cls} failed: {e!r}")
    if res["tokenizer_class_ok"] is None:  # keep DeepSeek-V3's own class
        for cp in cfg_paths:
            tc = json.load(open(cp, encoding="utf-8"))
            tc["tokenizer_class"] = "LlamaTokenizerFast"
            json.dump(tc, open(cp, "w", encoding="utf-8"), ensure_ascii=False, indent=2)
    return res


def hf_mtp_check(bf_dir, ids, h, ml, hN, dev):
    """transformers has no MTP module: run its decoder layer class on the MTP block's
    weights (the checkpoint loaded with one more layer) with the stored enorm/hnorm/
    eh_proj/shared_head, from transformers' own final hidden states hN; compare with
    the training code's h (MTP input) and MTP logits ml."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    res = {}
    L = CFG["num_hidden_layers"]
    hf2 = AutoModelForCausalLM.from_pretrained(bf_dir, dtype=torch.float32, attn_implementation="eager",
                                               num_hidden_layers=L + 1).to(dev).eval()
    w = {}
    with safe_open(os.path.join(bf_dir, "model.safetensors"), "pt") as f:
        for n in ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head"):
            w[n] = f.get_tensor(f"model.layers.{L}.{n}.weight").float().to(dev)
    eps = CFG["rms_norm_eps"]
    rms = lambda x, g: g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    with torch.no_grad():
        res["mtp_input_h_max_abs_diff"] = (hN - h).abs().max().item()
        nxt = torch.cat((ids[:, 1:], ids[:, :1]), 1)
        x = torch.cat((rms(w["embed_tokens"][nxt], w["enorm"]), rms(hN, w["hnorm"])), -1) @ w["eh_proj"].T
        T = ids.shape[1]
        pos = torch.arange(T, device=dev)[None]
        pe = hf2.model.rotary_emb(x, pos)
        mask = torch.full((T, T), float("-inf"), device=dev).triu(1)[None, None]
        y = hf2.model.layers[L](x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        y = y[0] if isinstance(y, tuple) else y
        mlg = rms(y, w["shared_head.norm"]) @ w["shared_head.head"].T
    dm = (mlg[:, :-1] - ml[:, :-1]).abs().max().item()
    res["mtp_logits_max_abs_diff"] = dm
    log(f"CHECK MTP through transformers' DeepseekV3DecoderLayer vs training code: max|diff| {dm:.3e}")
    del hf2
    return res


# --------------------------------------------------------------------------- distill-mtp

def distill_mtp(args):
    """Retrain the shipped model's MTP module as a draft of the main model: its target
    at p is the main model's own next-token distribution at p+1 (soft cross-entropy),
    on corpus windows and on the main model's greedy and sampled continuations (what
    it drafts for when serving). The main model is frozen: its weights, logits and
    refs stay bit for bit; only the MTP layer's tensors are replaced."""
    import shutil
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    dev = torch.device("cuda")
    torch.manual_seed(4321)
    torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    metrics = {"args": vars(args), "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    tok = Tokenizer.from_file(os.path.join(args.model, "bf16", "tokenizer.json"))
    tr = encode_docs(tok, load_docs(os.path.join(args.data, "train.jsonl.xz")))
    va = encode_docs(tok, load_docs(os.path.join(args.data, "val.jsonl.xz")))
    log(f"tokens: train {len(tr)}, val {len(va)}")
    tr_g = torch.from_numpy(tr.astype(np.int64)).to(dev)
    va_g = torch.from_numpy(va.astype(np.int64)).to(dev)
    V, T, P = CFG["vocab_size"], args.seq, args.prefix

    TinyV3, _ = build_model_classes()
    model = TinyV3(CFG).to(dev)
    import_state(model, {k: v.to(dev) for k, v in load_dir_state(os.path.join(args.model, "bf16")).items()})
    for p in model.parameters():
        p.requires_grad_(False)
    train_p = model.mtp_params()
    for p in train_p:
        p.requires_grad_(True)
    log(f"MTP parameters trained: {sum(p.numel() for p in train_p):,}; everything else frozen")
    model.eval()  # no dropout anywhere; eval() only documents that the main model does not train

    def windows(src, n, L, g=None):
        st = torch.randint(0, len(src) - L, (n,), device=dev, generator=g)
        return src[st[:, None] + torch.arange(L, device=dev)]

    @torch.no_grad()
    def generate(prefix, temp, g=None):
        seq = prefix
        while seq.shape[1] < T:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                lg = model(seq)[0][:, -1].float()
            nxt = lg.argmax(-1) if temp == 0 else \
                torch.multinomial(torch.softmax(lg / temp, -1), 1, generator=g)[:, 0]
            seq = torch.cat((seq, nxt[:, None]), 1)
        return seq

    # held-out continuations for the before/after figures (validation prefixes)
    ge = torch.Generator(device=dev)
    ge.manual_seed(99)
    ev_greedy = generate(windows(va_g, args.eval_seqs, P, ge), 0.0)
    ev_sample = generate(windows(va_g, args.eval_seqs, P, ge), args.temp, ge)

    @torch.no_grad()
    def evaluate():
        """Greedy acceptance = MTP argmax at p equals the main argmax at p+1; sampled
        acceptance at temperature t = sum_x min(p_t(x), q_t(x)) (speculative sampling's
        expected acceptance of one draft)."""
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        r = {}
        n = (len(va_g) - 2) // T
        sets = {"val_text": va_g[:n * T].view(n, T), "greedy_cont": ev_greedy, "sampled_cont": ev_sample}
        for name, seqs in sets.items():
            agree = soft = top1 = cnt = 0.0
            for i in range(0, len(seqs), 32):
                s_ = seqs[i:i + 32]
                lg, _, _, _, h = model(s_)
                ml = model.mtp(h[:, :-1], s_[:, 1:])[0]
                lo = P if name != "val_text" else 0  # continuations: the generated part
                tgt, q = lg[:, 1 + lo:].float(), ml[:, lo:].float()
                agree += (q.argmax(-1) == tgt.argmax(-1)).sum().item()
                pt, qt = torch.softmax(tgt / args.temp, -1), torch.softmax(q / args.temp, -1)
                soft += torch.minimum(pt, qt).sum(-1).sum().item()
                if name == "val_text":
                    top1 += (q[:, :-1].argmax(-1) == s_[:, 2:]).sum().item()
                cnt += tgt.shape[0] * tgt.shape[1]
            r[name] = {"greedy_accept": agree / cnt, f"sampled_accept_t{args.temp}": soft / cnt, "positions": int(cnt)}
            if name == "val_text":
                r[name]["mtp_top1_t+2"] = top1 / (cnt - len(seqs))
        torch.backends.cuda.matmul.allow_tf32 = tf32  # the refs below are float32 throughout
        return r

    before = evaluate()
    log("BEFORE " + json.dumps(before))
    metrics["before"] = before

    # on-policy pool: the main model's own continuations of training prefixes
    t0 = time.time()
    pool = []
    gp = torch.Generator(device=dev)
    gp.manual_seed(7)
    while time.time() - t0 < args.gen_s:
        temp = 0.0 if len(pool) % 2 == 0 else args.temp
        pool.append(generate(windows(tr_g, args.gen_batch, P, gp), temp, gp))
    pool = torch.cat(pool)
    log(f"generated {len(pool)} continuations of {T - P} tokens in {time.time() - t0:.0f} s "
        f"(half greedy, half at temperature {args.temp})")

    decay = [p for p in train_p if p.dim() >= 2]
    no_decay = [p for p in train_p if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    mtp_moe = model.mtp_block.mlp
    B = args.batch
    t_start = time.time()
    step = 0
    hist = []
    while True:
        frac = (time.time() - t_start) / args.train_s
        if frac >= 1.0:
            break
        lr = args.lr * (frac / 0.03 if frac < 0.03 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (frac - 0.03) / 0.97)))
        for gp_ in opt.param_groups:
            gp_["lr"] = lr
        nb = int(B * args.onpolicy)
        seq = torch.cat((windows(tr_g, B - nb, T), pool[torch.randint(0, len(pool), (nb,), device=dev)]))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                lg, _, _, _, h = model(seq)
            ml, bal, load = model.mtp(h[:, :-1], seq[:, 1:])
        teacher = torch.softmax(lg[:, 1:].float(), -1)
        loss = -(teacher * torch.log_softmax(ml.float(), -1)).sum(-1).mean() + args.alpha * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_p, 1.0)
        opt.step()
        with torch.no_grad():
            mtp_moe.bias += args.gamma * torch.sign(load.mean() - load)
            mtp_moe.bias -= mtp_moe.bias.min()
        step += 1
        if step % 200 == 0:
            with torch.no_grad():
                agree = (ml.argmax(-1) == lg[:, 1:].argmax(-1)).float().mean().item()
            log(f"step {step} lr {lr:.2e} loss {loss.item():.4f} batch agree {agree:.3f}")
            hist.append({"step": step, "loss": loss.item(), "agree": agree})
    metrics["train"] = {"steps": step, "seconds": time.time() - t_start, "batch": B, "seq": T, "history": hist}
    log(f"trained {step} steps in {time.time() - t_start:.0f} s")

    # ---- export: the shipped files with the MTP layer's own tensors replaced
    sd = export_state(model)
    pre = f"model.layers.{mtp_index()}."
    mine = [n for n in sd if n.startswith(pre) and not n.endswith(("embed_tokens.weight", "shared_head.head.weight"))]
    root = os.path.join(args.out, NAME)
    for which in ("bf16", "fp8"):
        d = os.path.join(root, which)
        shutil.copytree(os.path.join(args.model, which), d, dirs_exist_ok=True)
        out = dict(load_file(os.path.join(args.model, which, "model.safetensors")))
        for n in mine:
            t = sd[n]
            if n.endswith("e_score_correction_bias"):
                out[n] = t.float().contiguous()
            elif which == "fp8" and is_fp8_weight(n, t):
                out[n], out[n + "_scale_inv"] = quant_fp8(t)
            else:
                out[n] = t.to(torch.bfloat16).contiguous()
        save_file(out, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    log(f"replaced {len(mine)} MTP tensors in bf16/ and fp8/")

    # ---- figures and refs on the exported weights, float32 math
    torch.backends.cuda.matmul.allow_tf32 = False
    model.float()
    old = json.load(open(os.path.join(args.model, "ref", "ref.json"), encoding="utf-8"))
    ref_dir = os.path.join(root, "ref")
    shutil.copytree(os.path.join(args.model, "ref"), ref_dir, dirs_exist_ok=True)
    for which in ("bf16", "fp8"):
        import_state(model, {k: v.to(dev) for k, v in load_dir_state(os.path.join(root, which)).items()})
        ev = evaluate()
        log(f"AFTER ({which} copy) " + json.dumps(ev))
        metrics[f"after_{which}"] = ev
        ref, lg, ml = top20_ref(model, old["sequences"], dev, which)
        src = old if which == "bf16" else json.load(open(os.path.join(args.model, "ref", "ref_fp8.json")))
        d = max(abs(a - b) for so, sn in zip(src["main_top20"], ref["main_top20"]) for po, pn in zip(so, sn)
                for a, b in zip(po["logits"], pn["logits"]))
        metrics[f"main_top20_vs_shipped_{which}"] = d
        log(f"{which}: main top-20 against the shipped ref: max|diff| {d:.3g} (frozen main model)")
        ref["text"] = old.get("text")
        json.dump(ref, open(os.path.join(ref_dir, "ref.json" if which == "bf16" else "ref_fp8.json"), "w",
                            encoding="utf-8"), ensure_ascii=False)
        if which == "bf16":
            np.save(os.path.join(ref_dir, "mtp_logits_seq0_pos0-7.npy"), ml[0, :8].float().cpu().numpy())
            try:
                from transformers import AutoModelForCausalLM
                ids = torch.tensor(old["sequences"], device=dev)
                with torch.no_grad():
                    lg, ml, _, _, h = model(ids, torch.cat((ids[:, 1:], ids[:, :1]), 1))
                    hf = AutoModelForCausalLM.from_pretrained(os.path.join(root, "bf16"), dtype=torch.float32,
                                                              attn_implementation="eager").to(dev).eval()
                    hN = hf.model(ids).last_hidden_state
                metrics["checks"] = hf_mtp_check(os.path.join(root, "bf16"), ids, h, ml, hN, dev)
                del hf
            except Exception:
                import traceback
                metrics["checks"] = {"error": traceback.format_exc()}
                log("CHECK failed: " + traceback.format_exc())
    metrics["log"] = LOG
    json.dump(metrics, open(os.path.join(args.out, "distill_metrics.json"), "w"), indent=1)
    log("done")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep-tok")
    p.add_argument("src")
    p.add_argument("out")
    r = sub.add_parser("ref", help="check ref/ref.json against the shipped weights; write ref_fp8.json")
    r.add_argument("--model", default=f"models/{NAME}")
    r.add_argument("--out", required=True)
    r.add_argument("--write", action="store_true",
                   help="also write ref.json and the logits rows (after the weights changed), and check transformers")
    t = sub.add_parser("train")
    t.add_argument("--data", default=".gpu/train")
    t.add_argument("--out", required=True)
    t.add_argument("--budget-s", type=float, default=540, help="wall seconds for the whole run")
    t.add_argument("--reserve-s", type=float, default=75, help="kept for export and checks")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seq", type=int, default=1024)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--mtp-lambda", type=float, default=0.3)
    t.add_argument("--alpha", type=float, default=1e-4, help="sequence-wise balance loss weight")
    t.add_argument("--gamma", type=float, default=1e-3, help="bias update speed")
    t.add_argument("--compile", type=int, default=1)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--smoke", action="store_true", help="4 MB of text, for catching bugs")
    dm = sub.add_parser("distill-mtp", help="retrain the shipped MTP module as a draft of the main model")
    dm.add_argument("--model", default=f"models/{NAME}")
    dm.add_argument("--data", default=".gpu/train")
    dm.add_argument("--out", required=True)
    dm.add_argument("--seq", type=int, default=288, help="window length (prefix + continuation)")
    dm.add_argument("--prefix", type=int, default=32, help="corpus tokens before a generated continuation")
    dm.add_argument("--gen-s", type=float, default=45, help="seconds spent generating the on-policy pool")
    dm.add_argument("--gen-batch", type=int, default=512)
    dm.add_argument("--train-s", type=float, default=150)
    dm.add_argument("--batch", type=int, default=128)
    dm.add_argument("--onpolicy", type=float, default=0.5, help="share of each batch from the pool")
    dm.add_argument("--lr", type=float, default=1e-3)
    dm.add_argument("--temp", type=float, default=0.8, help="sampling temperature (pool and figures)")
    dm.add_argument("--eval-seqs", type=int, default=256)
    dm.add_argument("--alpha", type=float, default=1e-4)
    dm.add_argument("--gamma", type=float, default=1e-3)
    a = ap.parse_args()
    if a.cmd == "prep-tok":
        prep_tok(a.src, a.out)
    elif a.cmd == "ref":
        os.makedirs(a.out, exist_ok=True)
        make_ref(a)
    elif a.cmd == "distill-mtp":
        distill_mtp(a)
    else:
        train(a)


if __name__ == "__main__":
    main()

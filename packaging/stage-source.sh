#!/bin/bash
# stage-source.sh DEST — copies the source tree into DEST: tracked files and
# untracked ones git does not ignore (so work in progress builds too), or,
# outside a git checkout, everything but build folders.
set -euo pipefail
dest=$1
top=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$dest"
mkdir -p "$dest"
cd "$top"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
		[ -e "$f" ] && printf '%s\0' "$f"
	done | tar --null -T - -cf - | tar -C "$dest" -xf -
else
	tar --exclude='./build*' --exclude=./.git -cf - . | tar -C "$dest" -xf -
fi

#!/bin/bash
# build-deb.sh OUTDIR — builds the dsd, libdsclient0 and libdsclient-dev
# packages with dpkg-buildpackage from a staged copy of the tree, then runs
# lintian on them (errors fail the build; warnings need an override).
set -euo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
ver=$(sed -n '1s/^dsd (\([^)]*\)).*/\1/p' "$here/debian/changelog")
src=$out/dsd-$ver
rm -f "$out"/*.deb "$out"/*.changes "$out"/*.buildinfo
"$here/stage-source.sh" "$src"
rm -rf "$src/debian"
cp -a "$src/packaging/debian" "$src/debian"
jobs=$(nproc 2>/dev/null || echo 2)
# The staged tree goes once built: its build folder's *.d files (and
# debian/*/usr/lib/sysusers.d) would otherwise be read by the top Makefile's
# dependency include when $(BUILD) holds this output folder.
rc=0
(cd "$src" && dpkg-buildpackage -b -us -uc -j"$jobs" >"$out/build.log" 2>&1) || rc=$?
rm -rf "$src"
if [ $rc -ne 0 ]; then
	tail -60 "$out/build.log"
	echo "build-deb: dpkg-buildpackage failed; full log in $out/build.log" >&2
	exit 1
fi
changes=$(ls "$out"/dsd_"$ver"_*.changes)
echo "build-deb: built $(cd "$out" && ls ./*.deb | tr '\n' ' ')"
if command -v lintian >/dev/null; then
	lintian --fail-on error,warning --info "$changes" | tee "$out/lintian.log"
else
	echo "build-deb: lintian not installed, packages not checked" >&2
fi

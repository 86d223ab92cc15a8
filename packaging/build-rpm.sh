#!/bin/bash
# build-rpm.sh OUTDIR — builds the dsd, libdsclient and dsd-devel RPMs with
# rpmbuild from a tarball of the staged tree, then runs rpmlint on them
# (errors fail the build). On Debian, rpmbuild has no RPM database of the
# build dependencies (they are Debian packages), hence --nodeps there.
set -euo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
ver=$(sed -n 's/^Version:[[:space:]]*//p' "$here/rpm/dsd.spec")
top=$out/rpmbuild
rm -rf "$top"
mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS}
"$here/stage-source.sh" "$out/dsd-$ver"
tar -C "$out" -czf "$top/SOURCES/dsd-$ver.tar.gz" "dsd-$ver"
rm -rf "$out/dsd-$ver"
cp "$here/rpm/macros.systemd-fallback" "$top/SOURCES/"
cp -L "$here/rpm/dsd.sysusers" "$top/SOURCES/dsd.sysusers"
cp "$here/rpm/dsd.spec" "$top/SPECS/"
nodeps=()
[ -f /etc/debian_version ] && nodeps=(--nodeps)
jobs=$(nproc 2>/dev/null || echo 2)
rpmbuild -bb "${nodeps[@]}" --define "_topdir $top" --define "packager $(sed -n "s/^Maintainer: //p" "$here/debian/control")" --define "_smp_mflags -j$jobs" \
	"$top/SPECS/dsd.spec" >"$out/build.log" 2>&1 || rc=$?
# As in build-deb.sh: no build tree left where the top Makefile looks for *.d.
rm -rf "$top/BUILD" "$top/BUILDROOT"
if [ "${rc:-0}" -ne 0 ]; then
	tail -60 "$out/build.log"
	echo "build-rpm: rpmbuild failed; full log in $out/build.log" >&2
	exit 1
fi
rm -f "$out"/*.rpm
find "$top/RPMS" -name '*.rpm' -exec mv {} "$out/" \;
echo "build-rpm: built $(cd "$out" && ls ./*.rpm | tr '\n' ' ')"
if command -v rpmlint >/dev/null; then
	rpmlint -r "$here/rpm/dsd.rpmlintrc" "$out"/*.rpm "$here/rpm/dsd.spec" | tee "$out/rpmlint.log"
else
	echo "build-rpm: rpmlint not installed, packages not checked" >&2
fi

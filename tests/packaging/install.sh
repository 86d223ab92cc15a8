#!/bin/bash
# `make install DESTDIR=... PREFIX=/usr/local` from the tree: the expected
# files with the expected modes, units and pkg-config file rewritten for the
# prefix, a default configuration naming the installed model, and a program
# built from the staged header and library (pkg-config with a sysroot).
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=${DS_BUILD:-build}
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1"; [ -n "${2:-}" ] && sed 's/^/     | /' <<<"$2" | tail -30; }

D=$(mktemp -d /tmp/dsd-install.XXXXXX)
trap 'rm -rf "$D"' EXIT
P=/usr/local
if out=$(make --no-print-directory BUILD="$BUILD" install DESTDIR="$D" PREFIX=$P 2>&1); then
	ok "make install DESTDIR=... PREFIX=$P"
else
	bad "make install" "$out"
	echo "$pass passed, $fail failed"
	exit 1
fi

want=(
	"755 $P/sbin/dsd" "755 $P/bin/dsctl" "755 $P/lib/libdsclient.so.0" "644 $P/include/dsclient.h"
	"644 $P/lib/pkgconfig/dsclient.pc" "644 $P/etc/dsd/dsd.conf" "644 $P/lib/systemd/system/dsd.service"
	"644 $P/lib/systemd/system/dsd.socket" "644 $P/lib/sysusers.d/dsd.conf" "644 $P/share/man/man8/dsd.8"
	"644 $P/share/man/man1/dsctl.1" "644 $P/share/man/man5/dsd.conf.5" "644 $P/share/man/man3/libdsclient.3"
)
miss=()
for w in "${want[@]}"; do
	mode=${w%% *}
	f=$D${w#* }
	[ -f "$f" ] && [ "$(stat -c %a "$f")" = "$mode" ] || miss+=("$w")
done
if [ ${#miss[@]} -eq 0 ]; then ok "installed files and modes"; else bad "missing or wrong mode" "${miss[*]}"; fi
[ "$(readlink "$D$P/lib/libdsclient.so")" = libdsclient.so.0 ] && ok "libdsclient.so -> libdsclient.so.0" ||
	bad "libdsclient.so link"

svc=$D$P/lib/systemd/system/dsd.service
if grep -qx "ExecStart=$P/sbin/dsd serve --config $P/etc/dsd/dsd.conf" "$svc" && ! grep -q '/usr/sbin/dsd' "$svc"; then
	ok "dsd.service runs $P/sbin/dsd with $P/etc/dsd/dsd.conf"
else
	bad "dsd.service paths" "$(grep -n 'dsd' "$svc" | grep -E 'Exec|conf')"
fi
model=$(sed -n 's/^path *= *//p' "$D$P/etc/dsd/dsd.conf")
if [ "$model" != "${model#$P/share/dsd/models/}" ] && [ -f "$D$model/config.json" ]; then
	ok "dsd.conf names the installed model ($model)"
else
	bad "dsd.conf model path '$model'" "$(cat "$D$P/etc/dsd/dsd.conf")"
fi
grep -qx "backend = auto" "$D$P/etc/dsd/dsd.conf" && ok "dsd.conf: backend = auto" || bad "dsd.conf backend"
# Identical files of the other model variants are links to the default's.
dups=$(find "$D$P/share/dsd/models" -type f -printf '%s %p\n' | sort | awk '{ print $1 }' | uniq -d | head -1)
links=$(find "$D$P/share/dsd/models" -type l | wc -l)
if [ -z "$dups" ] || [ "$links" -gt 0 ]; then ok "model variants share identical files ($links links)"; else
	bad "duplicate model files were not linked"; fi

pc=$D$P/lib/pkgconfig
flags=$(PKG_CONFIG_PATH=$pc PKG_CONFIG_SYSROOT_DIR=$D pkg-config --cflags --libs dsclient 2>&1 | xargs)
if [ "$flags" = "-I$D$P/include -L$D$P/lib -ldsclient" ]; then ok "pkg-config dsclient: $flags"; else
	bad "pkg-config dsclient" "$flags"; fi
# shellcheck disable=SC2086
if out=$(cc -std=c11 -Wall -Werror -o "$D/client" tests/packaging/client_smoke.c $flags 2>&1) &&
	out=$(LD_LIBRARY_PATH=$D$P/lib "$D/client" 2>&1; echo "rc=$?") && grep -q 'usage: client_smoke SOCKET' <<<"$out" &&
	grep -q 'rc=2' <<<"$out"; then
	ok "a program builds against the staged header and library and runs"
else
	bad "building against the staged install" "$out"
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]

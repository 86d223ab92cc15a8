#!/bin/bash
# The manual pages against the code they describe: each renders without a
# groff warning; every key of conf/conf.c's table (and its flag) is in
# dsd.conf(5); every verb of dsd (daemon/main.c) is in dsd(8) and of dsctl
# (client-lib/dsctl.c) in dsctl(1); every function of client-lib/dsclient.h
# is in libdsclient(3); every page the units cite exists.
set -uo pipefail
cd "$(dirname "$0")/../.."
M=packaging/man
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1"; [ -n "${2:-}" ] && sed 's/^/     | /' <<<"$2"; }

pages=(dsd.8 dsctl.1 dsd.conf.5 libdsclient.3)
for p in "${pages[@]}"; do
	if [ ! -f "$M/$p" ]; then bad "$p exists"; continue; fi
	# -ww: all warnings; -z: no output. groff comes with man-db.
	w=$(groff -man -ww -z -t "$M/$p" 2>&1)
	if [ -z "$w" ]; then ok "$p renders without warnings"; else bad "$p: groff warnings" "$w"; fi
done

# Names from the C tables (one { "name", ... } entry a line).
missing=()
while read -r sec key flag; do
	grep -Eq "^\.BR? $key( |$)" "$M/dsd.conf.5" || missing+=("[$sec] $key")
	# roff writes a dash as \-
	grep -Fq -- "$(sed 's/-/\\-/g' <<<"--$flag")" "$M/dsd.conf.5" || missing+=("--$flag")
done < <(sed -nE 's/^\s*\{ "([a-z_]+)", "([a-z_0-9]+)", "([a-z0-9-]+)", DS_CONF_T.*/\1 \2 \3/p' conf/conf.c)
if [ ${#missing[@]} -eq 0 ]; then ok "dsd.conf(5) documents every key of conf/conf.c"; else
	bad "dsd.conf(5) lacks" "${missing[*]}"; fi

# The KEYS section is generated from the table (make man-conf): it must match.
BUILD=${DS_BUILD:-build}
if out=$(make --no-print-directory -s BUILD="$BUILD" "$BUILD/gen_conf_keys" 2>&1); then
	d=$(diff <("$BUILD/gen_conf_keys") <(awk '/^\.SH KEYS$/ { k = 1; next } /^\.SH / { k = 0 } k' "$M/dsd.conf.5"))
	if [ -z "$d" ]; then ok "dsd.conf(5) KEYS section matches conf/'s table"; else
		bad "dsd.conf(5) is stale: run make man-conf" "$d"; fi
else
	bad "building $BUILD/gen_conf_keys" "$out"
fi

check_verbs() { # check_verbs PAGE SOURCE
	local miss=()
	[ -f "$2" ] || { bad "$2 exists (for $1's verbs)"; return; }
	while read -r v; do
		grep -Eq "^\.B $v( |$)|^\.B $(sed 's/-/\\\\-/g' <<<"$v")( |$)" "$M/$1" || miss+=("$v")
	done < <(sed -n '/verbs\[\] = {/,/^};/p' "$2" | sed -nE 's/^\s*\{ "([a-z][a-z-]*)", [a-z_]+,.*/\1/p')
	if [ ${#miss[@]} -eq 0 ]; then ok "$1 documents every verb of $2"; else bad "$1 lacks verbs" "${miss[*]}"; fi
}
check_verbs dsd.8 daemon/main.c
check_verbs dsctl.1 client-lib/dsctl.c

if [ -f client-lib/dsclient.h ]; then
	miss=()
	while read -r fn; do
		grep -Fq "$fn" "$M/libdsclient.3" || miss+=("$fn")
	done < <(grep -oE '\bds_[a-z0-9_]+\s*\(' client-lib/dsclient.h | sed -E 's/\s*\($//' | sort -u)
	if [ ${#miss[@]} -eq 0 ]; then ok "libdsclient(3) documents every function of dsclient.h"; else
		bad "libdsclient(3) lacks" "${miss[*]}"; fi
else
	bad "client-lib/dsclient.h exists"
fi

miss=()
for ref in $(sed -n 's/^Documentation=//p' packaging/systemd/*.service packaging/systemd/*.socket | tr ' ' '\n' | sort -u); do
	page=$(sed -E 's/^man:([^(]+)\(([0-9])\)$/\1.\2/' <<<"$ref")
	[ -f "$M/$page" ] || miss+=("$ref")
done
if [ ${#miss[@]} -eq 0 ]; then ok "every Documentation= page of the units is shipped"; else bad "units cite missing pages" "${miss[*]}"; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]

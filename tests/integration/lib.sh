# lib.sh — sourced by the integration tests: the ok/bad/check counters (the
# caller ends with `echo "$pass passed, $fail failed"`), a temporary
# directory $T with $SOCK and an empty config, a daemon pid $DPID that the
# exit trap stops, and helpers that read `dsctl stats --json`.
# Needs BUILD/DSD/DSCTL set by the caller.
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1"; [ -n "${2:-}" ] && sed 's/^/     | /' <<<"$2"; }
check() { if [ "$1" = "$2" ]; then ok "$3"; else bad "$3" "got:  $1"$'\n'"want: $2"; fi; }

export LSAN_OPTIONS=suppressions=$(readlink -f tests/integration/lsan.supp)${LSAN_OPTIONS:+:$LSAN_OPTIONS}
T=$(mktemp -d)
SOCK=$T/dsd.sock
: >"$T/empty.conf"
DPID=
cleanup() {
	[ -n "$DPID" ] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null
	[ -n "${KEEP:-}" ] && echo "kept $T" || rm -rf "$T"
}
trap cleanup EXIT

if [ ! -x "$DSD" ] || [ ! -x "$DSCTL" ]; then
	bad "binaries built ($DSD, $DSCTL)"
	echo "$pass passed, $fail failed"
	exit 1
fi

# the first number after "key": in a JSON text
num() { grep -o "\"$1\":[0-9.e+-]*" <<<"$2" | head -1 | cut -d: -f2; }
# stats are published by the engine thread between steps: wait up to 3 s
# for a pattern in them; prints the last stats either way
stats_until() { # grep-pattern
	local st
	for _ in $(seq 60); do
		st=$("$DSCTL" --socket "$SOCK" stats --json)
		grep -q "$1" <<<"$st" && { echo "$st"; return 0; }
		sleep 0.05
	done
	echo "$st"
	return 1
}

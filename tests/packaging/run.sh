#!/bin/bash
# make check-packaging: runs the packaging test scripts in order and ends with
# the sum of their "N passed, N failed" lines (exit 1 if any failed).
set -uo pipefail
cd "$(dirname "$0")/../.."
passed=0
failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in manpages install check_packaging; do
	echo "== tests/packaging/$t.sh"
	bash "tests/packaging/$t.sh" 2>&1 | tee "$log"
	rc=${PIPESTATUS[0]}
	line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -1)
	p=$(cut -d' ' -f1 <<<"$line")
	f=$(cut -d' ' -f3 <<<"$line")
	passed=$((passed + ${p:-0}))
	failed=$((failed + ${f:-0}))
	if [ $rc -ne 0 ] && [ "${f:-0}" -eq 0 ]; then failed=$((failed + 1)); echo "FAIL tests/packaging/$t.sh exited $rc"; fi
done
echo "check-packaging: $passed passed, $failed failed"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

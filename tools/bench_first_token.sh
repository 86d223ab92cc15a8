#!/bin/bash
# Time from `dsd serve` to the first generated token, page cache dropped first
# (root, on the GPU machine). bench_first_token.sh BUILD MODEL_DIR URING(0|1) RUNS
set -uo pipefail
B=$1; M=$2; U=$3; N=${4:-3}
S=/tmp/dsd-ft.sock
for r in $(seq "$N"); do
	sync; echo 3 >/proc/sys/vm/drop_caches
	rm -f "$S"
	t0=$(date +%s.%N)
	"$B/bin/dsd" serve --config /dev/null --model "$M" --backend cuda --socket "$S" --uring-load "$U" 2>/tmp/dsd-ft.log &
	P=$!
	until "$B/bin/dsctl" --socket "$S" run --prompt-ids 1,2,3 --max-tokens 1 --ids >/dev/null 2>&1; do
		kill -0 $P 2>/dev/null || { echo "dsd died:"; cat /tmp/dsd-ft.log; exit 1; }
		sleep 0.05
	done
	t1=$(date +%s.%N)
	printf 'uring_load=%s run %d: serve to first token %.2f s; %s\n' "$U" "$r" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
		"$(grep -o 'streamed.*\|loaded in [0-9.]* s' /tmp/dsd-ft.log | tr '\n' ' ')"
	kill $P; wait $P
done

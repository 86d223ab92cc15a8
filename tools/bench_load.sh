#!/usr/bin/env bash
# bench_load.sh — weight load rate, disk -> GPU memory (issue 8), on the GPU machine.
# Generates random V2-Lite-shaped bf16 shards (LAYERS of 27; 18 = ~21 GB) on the
# local disk, then REPS times: drop the page cache, and run each method:
#   fio    sequential O_DIRECT reads of the same files (the disk's ceiling)
#   uring  ds_wload (io_uring, O_DIRECT, registered pinned staging) -> cudaMemcpyAsync
#   read   pread + cudaMemcpy per tensor          mmap  cudaMemcpy from the mapping
# Prints the median GB/s (1e9 bytes/s) of each and the ratios the issue asks for.
# Env: BUILD (build dir with bench/bench_load), BENCH_DIR, LAYERS, REPS, FIO,
#      QUICK=1 (small model; sweeps fio/uring settings and verifies on the GPU),
#      URING_ARGS (extra bench_load options), OUT (logs copied there).
set -uo pipefail
BUILD=${BUILD:-build}
BIN=$BUILD/bench/bench_load
BENCH_DIR=${BENCH_DIR:-$PWD/.gpu/bench-data}
LAYERS=${LAYERS:-18}
REPS=${REPS:-2}
QUICK=${QUICK:-0}
FIO=${FIO:-$(command -v fio || echo .gpu/uring/fio)}
URING_ARGS=${URING_ARGS:-}
LOG=${OUT:-/tmp}/bench_load.log
: >"$LOG"

say() { echo "$@" | tee -a "$LOG"; }
dropped=1
drop() {
	sync
	if ! echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
		[ $dropped = 1 ] && say "WARNING: cannot drop the page cache: figures may include cached reads"
		dropped=0
	fi
}

[ -x "$BIN" ] || { echo "no $BIN: make BUILD=$BUILD $BIN" >&2; exit 1; }
say "== $(date -u +%FT%TZ) $(nvidia-smi -L 2>/dev/null | head -1)"
say "== disk: $(df -h "$(dirname "$BENCH_DIR")" | tail -1)"
say "== cpus $(nproc), mem $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r)"
rm -rf "$BENCH_DIR"
$BIN gen "$BENCH_DIR" "$LAYERS" 4 | tee -a "$LOG" || exit 1
drop
FILES=$(ls "$BENCH_DIR"/*.safetensors | paste -sd:)
say "== $(du -sh "$BENCH_DIR" | cut -f1) in $(ls "$BENCH_DIR"/*.safetensors | wc -l) shards; page cache dropped: $dropped"

# fio: io_uring engine, O_DIRECT, all shards one after another.
run_fio() { # name bs iodepth
	drop
	local j
	j=$("$FIO" --name=seq --rw=read --direct=1 --ioengine=io_uring --bs="$2" --iodepth="$3" \
		--file_service_type=sequential --filename="$FILES" --output-format=json 2>>"$LOG") || {
		say "fio failed"; return; }
	python3 -c 'import json,sys; r=json.loads(sys.stdin.read())["jobs"][0]["read"]
print("method=%s bytes=%d seconds=%.3f GBps=%.3f" % (sys.argv[1], r["io_bytes"], r["runtime"]/1e3, r["io_bytes"]/r["runtime"]/1e6))' "$1" <<<"$j" | tee -a "$LOG"
}
run_bin() { # name method args...
	local name=$1; shift
	drop
	$BIN run "$BENCH_DIR" "$@" 2>&1 | sed "s/^method=[a-z]*/method=$name/" | tee -a "$LOG"
}

if [ "$QUICK" = 1 ]; then
	run_fio fio-1m-qd32 1m 32
	run_fio fio-4m-qd16 4m 16
	run_fio fio-16m-qd8 16m 8
	run_bin uring-verify uring --verify
	run_bin uring-1m-x32 uring --buf 1 --bufs 32
	run_bin uring-4m-x16 uring --buf 4 --bufs 16
	run_bin uring-8m-x16 uring --buf 8 --bufs 16
	run_bin uring-16m-x8 uring --buf 16 --bufs 8
	run_bin uring-sif1 uring --sif 1
	run_bin uring-sif4 uring --sif 4
	run_bin host host
	run_bin read read
	run_bin mmap mmap
else
	for r in $(seq "$REPS"); do
		run_fio fio-4m-qd16 4m 16
		run_fio fio-1m-qd32 1m 32
		# The first rep also checks sampled tensors on the GPU (after the timing).
		run_bin uring uring $URING_ARGS $([ "$r" = 1 ] && echo --verify)
		run_bin read read
		run_bin mmap mmap
	done
fi

say "== medians (GB/s)"
python3 - "$LOG" <<'EOF' | tee -a "$LOG"
import re, sys, statistics as st
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r"method=(\S+) .*GBps=([0-9.]+)", line)
    if m:
        runs.setdefault(m.group(1), []).append(float(m.group(2)))
med = {k: st.median(v) for k, v in runs.items()}
for k, v in runs.items():
    print("%-14s runs=%d median=%.3f  [%s]" % (k, len(v), med[k], " ".join("%.3f" % x for x in v)))
fio = max([v for k, v in med.items() if k.startswith("fio")] or [0])
if fio and "uring" in med:
    base = max(med.get("read", 0), med.get("mmap", 0))
    print("uring / best fio = %.1f%%  (goal >= 90%%)" % (100 * med["uring"] / fio))
    if base:
        print("uring / max(read, mmap) = %.2fx  (goal >= 1.5x)" % (med["uring"] / base))
EOF
rm -rf "$BENCH_DIR"

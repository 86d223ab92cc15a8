#!/bin/bash
# The GPU machine's part of `make check-gpu` / `make bench-gpu` for a carried
# build folder (no rebuild there): gpu_run.sh BUILD tests|bench-v2|bench-fp8|spec|first-token
set -o pipefail
B=$1; what=$2
export PYTHONUNBUFFERED=1
M=/tmp/dsd-bench-models
case $what in
tests)
	python3 tools/make_bench_models.py --tiny /tmp/gm || exit 1
	fail=0
	$B/tests/test_cuda_ops || fail=1
	$B/tests/test_cuda_prefill || fail=1
	DS_GPU_MODELS=/tmp/gm $B/tests/test_cuda_backend || fail=1
	exit $fail ;;
bench-v2)
	python3 - <<'PY' || exit 1
import sys; sys.argv = ["x", "--bench", "/tmp/dsd-bench-models"]
sys.path.insert(0, "tools"); import make_bench_models as m
m.write_model("/tmp/dsd-bench-models/v2lite-bf16", m.v2_config(False), False, 3, True)
PY
	timeout 240 $B/bench/bench_gpu $M/v2lite-bf16 v2lite-bf16
	timeout 200 python3 tests/bench_transformers.py $M/v2lite-bf16 v2lite-bf16 1,8
	rm -rf $M/v2lite-bf16 ;;
bench-fp8)
	python3 - <<'PY' || exit 1
import sys
sys.path.insert(0, "tools"); import make_bench_models as m
m.write_model("/tmp/dsd-bench-models/v2lite-fp8", m.v2_config(False), True, 3, True)
PY
	timeout 240 $B/bench/bench_gpu $M/v2lite-fp8 v2lite-fp8
	rm -rf $M/v2lite-fp8
	python3 - <<'PY' || exit 1
import sys
sys.path.insert(0, "tools"); import make_bench_models as m
m.write_model("/tmp/dsd-bench-models/v3slice-fp8", m.v3_config(False), True, 4, True)
PY
	timeout 300 $B/bench/bench_gpu $M/v3slice-fp8 v3slice-fp8
	rm -rf $M/v3slice-fp8 ;;
first-token)
	# dsd serve -> first token on the V2-Lite-shaped model (31.4 GB), weights
	# streamed with io_uring vs uploaded from the mapping, page cache dropped
	python3 - <<'PY' || exit 1
import sys
sys.path.insert(0, "tools"); import make_bench_models as m
m.write_model("/tmp/dsd-bench-models/v2lite-bf16", m.v2_config(False), False, 3, True)
PY
	tools/bench_first_token.sh $B $M/v2lite-bf16 1 3
	tools/bench_first_token.sh $B $M/v2lite-bf16 0 2
	rm -rf $M/v2lite-bf16 ;;
spec)
	# speculative decoding: the trained default model (acceptance is real),
	# then the verify-2 / 1-token step ratio on the V2-Lite-shaped model
	timeout 120 $B/bench/bench_spec --backend cuda --batches 1,4,16,64 models/dsv3-tiny/bf16
	timeout 120 $B/bench/bench_spec --eager --backend cuda --batches 1,4,16,64 models/dsv3-tiny/bf16
	timeout 120 $B/bench/bench_spec --backend cuda --batches 1,4,16,64 models/dsv3-tiny/fp8
	# depth 2 (chained on the device), and what each depth's step costs
	timeout 120 $B/bench/bench_spec --backend cuda --depth 2 --batches 1,4,16,64 models/dsv3-tiny/bf16
	timeout 120 $B/bench/bench_spec --steps --backend cuda --batches 1,4,16 --context 256 models/dsv3-tiny/bf16
	DS_BUILD=$B DS_BACKEND=cuda DS_MTP_SAMPLES=100 timeout 150 bash tests/integration/mtp.sh
	python3 - <<'PY' || exit 1
import sys
sys.path.insert(0, "tools"); import make_bench_models as m
m.write_model("/tmp/dsd-bench-models/v2lite-bf16", m.v2_config(False), False, 3, True)
PY
	timeout 240 $B/bench/bench_spec --ratio --backend cuda --batches 1,4,16,64 $M/v2lite-bf16
	timeout 240 $B/bench/bench_spec --ratio --eager --backend cuda --batches 1,4,16,64 $M/v2lite-bf16
	rm -rf $M/v2lite-bf16
	# the same shape with an MTP layer: chained steps at depths 1-4
	python3 - <<'PY' || exit 1
import sys
sys.path.insert(0, "tools"); import make_bench_models as m
m.write_model("/tmp/dsd-bench-models/v2lite-mtp", dict(m.v2_config(False), num_nextn_predict_layers=1), False, 3, True)
PY
	timeout 240 $B/bench/bench_spec --steps --backend cuda --batches 1,4,16 --context 512 $M/v2lite-mtp
	rm -rf $M/v2lite-mtp ;;
esac

# kernels/: the CUDA backend. Built where nvcc is found (CUDA=1); without it
# the engine offers the CPU backend only.
ifeq ($(CUDA),1)
CUDA_SRCS += $(sort $(wildcard kernels/*.cu))
LIB_SRCS += kernels/cuda_backend.c
# model/backend.c refers to ds_cuda_backend weakly, which alone does not pull
# it out of libds.a: every program links it in.
LDFLAGS += -Wl,-u,ds_cuda_backend
endif

# GPU tests and benchmarks, run on the GPU machine (they exit 77 without a GPU).
GPU_MODELS ?= $(BUILD)/gpu-models
check-gpu: all
	@set -o pipefail; python3 tools/make_bench_models.py --tiny $(GPU_MODELS)
	@fail=0; for t in $(BUILD)/tests/test_cuda_ops $(BUILD)/tests/test_cuda_backend; do \
		echo "== $$t"; DS_GPU_MODELS=$(GPU_MODELS) $$t || fail=$$((fail+1)); done; \
	echo "check-gpu: $$fail failed"; [ $$fail -eq 0 ]

BENCH_MODELS ?= /tmp/dsd-bench-models
bench-gpu: all
	python3 tools/make_bench_models.py --bench $(BENCH_MODELS)
	$(BUILD)/bench/bench_gpu $(BENCH_MODELS)
.PHONY: check-gpu bench-gpu

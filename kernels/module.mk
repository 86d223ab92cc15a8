# kernels/: the CUDA backend. Built where nvcc is found (CUDA=1); without it
# the engine offers the CPU backend only.
ifeq ($(CUDA),1)
CUDA_SRCS += $(sort $(wildcard kernels/*.cu))
LIB_SRCS += kernels/cuda_backend.c kernels/cuda_layer.c kernels/graph.c
# model/backend.c refers to ds_cuda_backend weakly, which alone does not pull
# it out of libds.a: every program links it in.
LDFLAGS += -Wl,-u,ds_cuda_backend
endif

# GPU tests and benchmarks, for the GPU machine. They use the binaries of an
# earlier `make BUILD=... all` (the GPU machine lacks the build dependencies:
# build here, carry $(BUILD)) and write random models under /tmp.
#   make BUILD=build-cuda check-gpu   op tests + backend vs CPU on tiny models
#   make BUILD=build-cuda bench-gpu   V2-Lite bf16/FP8 + 4-layer V3 FP8 slice,
#                                     transformers eager baseline (needs ~40 GB disk)
check-gpu:
	kernels/gpu_run.sh $(BUILD) tests

bench-gpu:
	DS_BENCH_PROFILE=1 kernels/gpu_run.sh $(BUILD) bench-v2
	DS_BENCH_PROFILE=1 kernels/gpu_run.sh $(BUILD) bench-fp8
.PHONY: check-gpu bench-gpu
# speculative decoding on the GPU (docs/PERFORMANCE.md): bench_spec on the
# default model, mtp.sh against the CUDA backend, verify-2/1 ratio on V2-Lite
bench-spec-gpu:
	kernels/gpu_run.sh $(BUILD) spec
.PHONY: bench-spec-gpu

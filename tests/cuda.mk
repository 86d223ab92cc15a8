# CUDA backend tests (kernels/): each op against its CPU reference, the
# prefill kernels against float64, the backend against the CPU backend. Built with CUDA=1; they exit 77 without a GPU.
ifeq ($(CUDA),1)
TESTS += test_cuda_ops test_cuda_prefill test_cuda_backend
test_cuda_ops_SRCS := tests/test_cuda_ops.c tests/cuda_test_util.c
test_cuda_prefill_SRCS := tests/test_cuda_prefill.c tests/cuda_test_util.c
test_cuda_backend_SRCS := tests/test_cuda_backend.c tests/fixture_util.c
endif

ifeq ($(CUDA),1)
BENCHES += bench_gpu
bench_gpu_SRCS := tests/bench_gpu.c
endif

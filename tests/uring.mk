# issue 8: the io_uring weight loader against the mmap path, and its failures.
TESTS += test_wload
test_wload_SRCS := tests/test_wload.c tests/fixture_util.c

# The load-rate benchmark needs the GPU (CUDA sink): built only with CUDA.
ifeq ($(CUDA),1)
BENCHES += bench_load
bench_load_SRCS := tools/bench_load.c
endif

# On the GPU machine: tools/bench_load.sh (generates >= 20 GB of V2-Lite-shaped
# shards, drops the page cache before each run, compares with fio/read/mmap).
bench-load: $(BUILD)/bench/bench_load
	BUILD=$(BUILD) tools/bench_load.sh
.PHONY: bench-load

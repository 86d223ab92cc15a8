# Engine core: model loading, CPU reference against transformers fixtures, sampler.
TESTS += test_engine test_model_errors test_sampler test_spec
test_spec_SRCS := tests/test_spec.c tests/fixture_util.c
test_engine_SRCS := tests/test_engine.c tests/fixture_util.c
test_model_errors_SRCS := tests/test_model_errors.c tests/fixture_util.c
test_sampler_SRCS := tests/test_sampler.c

FUZZERS += fuzz_safetensors
fuzz_safetensors_SRCS := tests/fuzz/fuzz_safetensors.c
fuzz_safetensors_LIBSRCS := model/safetensors.c model/dtype.c model/err.c model/config.c
fuzz_safetensors_LDLIBS := -lcjson

BENCHES += bench_cpu
bench_cpu_SRCS := tests/bench_cpu.c

bench-cpu: $(BUILD)/bench/bench_cpu
	$(BUILD)/bench/bench_cpu tests/fixtures/v3 tests/fixtures/v2lite tests/fixtures/fp8 $(wildcard models/*/bf16)
.PHONY: bench-cpu

# the host sampler on V3's vocabulary: selection vs the full sort it replaced
BENCHES += bench_sampler
bench_sampler_SRCS := tests/bench_sampler.c
bench-sampler: $(BUILD)/bench/bench_sampler
	$(BUILD)/bench/bench_sampler
.PHONY: bench-sampler

# speculative decoding: MTP off / KV only / drafting at batch 1..64, and the
# verify-2 over 1-token step ratio (docs/PERFORMANCE.md)
BENCHES += bench_spec
bench_spec_SRCS := tests/bench_spec.c
bench-spec: $(BUILD)/bench/bench_spec
	$(BUILD)/bench/bench_spec --threads $(or $(DS_BENCH_THREADS),0) models/dsv3-tiny/bf16
	$(BUILD)/bench/bench_spec --ratio --threads $(or $(DS_BENCH_THREADS),0) --batches 1,4,16 --context 256 models/dsv3-tiny/bf16
.PHONY: bench-spec

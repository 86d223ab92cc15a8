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

# cache/: prefix cache and scheduling policy, tested without the engine,
# then the KV manager on the CPU engine with the v3 fixture.
TESTS += test_prefix test_sched test_prefix_engine
test_prefix_SRCS := tests/test_prefix.c
test_sched_SRCS := tests/test_sched.c
test_prefix_engine_SRCS := tests/test_prefix_engine.c tests/fixture_util.c

BENCHES += bench_prefix
bench_prefix_SRCS := tests/bench_prefix.c

# TTFT with a shared 2,000-token prefix and 64 requests on one system prompt,
# prefix cache off and on (docs/PERFORMANCE.md). One thread, CPU time reported
# beside wall time because shared machines make wall time swing.
bench-prefix: $(BUILD)/bench/bench_prefix
	OMP_WAIT_POLICY=passive DS_BENCH_THREADS=$${DS_BENCH_THREADS:-1} $(BUILD)/bench/bench_prefix tests/fixtures/v3 $(wildcard models/*/bf16)
.PHONY: bench-prefix

# The prefix cache through a real dsd: identical tokens, stats keys, dsctl cache flush.
SHELL_TESTS += tests/integration/prefix_cache.sh
SHELL_TESTS += tests/integration/mtp.sh

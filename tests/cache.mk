# cache/: prefix cache and scheduling policy, tested without the engine,
# then the KV manager on the CPU engine with the v3 fixture.
TESTS += test_prefix test_sched test_prefix_engine
test_prefix_SRCS := tests/test_prefix.c
test_sched_SRCS := tests/test_sched.c
test_prefix_engine_SRCS := tests/test_prefix_engine.c tests/fixture_util.c

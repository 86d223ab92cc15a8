# cache/: prefix cache and scheduling policy, tested without the engine.
TESTS += test_prefix test_sched
test_prefix_SRCS := tests/test_prefix.c
test_sched_SRCS := tests/test_sched.c

# issue 8: the io_uring weight loader against the mmap path, and its failures.
TESTS += test_wload
test_wload_SRCS := tests/test_wload.c tests/fixture_util.c

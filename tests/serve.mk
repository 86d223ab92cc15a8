# Serving path: ipc/ and conf/ unit tests, the daemon integration test, the
# protocol fuzzer, the ring benchmark (make bench-ipc).
TESTS += test_ipc test_conf
test_ipc_SRCS := tests/test_ipc.c
test_conf_SRCS := tests/test_conf.c

PROGS += serve_driver
serve_driver_DIR := tests
serve_driver_SRCS := tests/serve_driver.c client-lib/dsclient.c
SHELL_TESTS += tests/integration/serve.sh

FUZZERS += fuzz_proto
fuzz_proto_SRCS := tests/fuzz/fuzz_proto.c
fuzz_proto_LIBSRCS := ipc/prescan.c ipc/proto.c
fuzz_proto_LDLIBS := -lmsgpackc

BENCHES += bench_ipc
bench_ipc_SRCS := tests/bench_ipc.c

bench-ipc: $(BUILD)/bench/bench_ipc
	$(BUILD)/bench/bench_ipc
.PHONY: bench-ipc

# dsd — top-level GNU Makefile.
# Each top-level folder contributes a module.mk that appends to the lists below
# (LIB_SRCS, PROGS, TESTS, FUZZERS, CUDA_SRCS); this file owns the rules.
# `make` builds everything; `make check` builds and runs every test;
# `make check SANITIZE=address,undefined` does the same under sanitizers.

.DEFAULT_GOAL := all
SHELL := /bin/bash

SANITIZE ?=
BUILD ?= $(if $(SANITIZE),build-san,build)
CC ?= cc
# The CPU reference is built for x86-64-v3 (AVX2/FMA) by default so one build
# runs on this machine, CI and the GPU machine; `make CPU_ARCH=native` for more.
CPU_ARCH ?= x86-64-v3
OPT ?= -O2

PKG_LIBS := libcjson libpcre2-8 msgpack liburing libsystemd inih
PKG_CFLAGS := $(shell pkg-config --cflags $(PKG_LIBS) 2>/dev/null)

CPPFLAGS += -I. -D_GNU_SOURCE
CFLAGS += -std=c11 $(OPT) -g -march=$(CPU_ARCH) -fopenmp -fPIC \
	-Wall -Wextra -Werror -Wno-unused-parameter -Wshadow -Wvla \
	-MMD -MP $(PKG_CFLAGS)
# The packages build with RPATH= CUDA_RPATH= (installed binaries use ld.so's paths).
RPATH ?= -Wl,-rpath,'$$ORIGIN/../lib'
LDFLAGS += -fopenmp $(RPATH)
# msgpack-c and liburing are linked statically: the GPU machine has neither.
STATIC_LIBS := -Wl,-Bstatic -lmsgpackc -luring -Wl,-Bdynamic
LDLIBS += $(STATIC_LIBS) -lcjson -lpcre2-8 -linih -lsystemd -lm -lpthread

ifneq ($(SANITIZE),)
CFLAGS += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -fno-sanitize-recover=all
LDFLAGS += -fsanitize=$(SANITIZE)
endif

NVCC ?= $(or $(shell command -v nvcc 2>/dev/null),$(wildcard /usr/local/cuda/bin/nvcc))
CUDA_HOME ?= $(if $(NVCC),$(patsubst %/bin/nvcc,%,$(NVCC)))
CUDA_RPATH ?= -Wl,-rpath,$(CUDA_HOME)/lib64
# sm_90a SASS for Hopper plus compute_90 PTX so newer GPUs can JIT.
NVCC_ARCH ?= -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_90,code=compute_90
NVCCFLAGS ?= -O3 -std=c++17 $(NVCC_ARCH) -Xcompiler -fPIC,-Wall,-Werror -I. --expt-relaxed-constexpr
# CUDA is off under sanitizers (ASan and the CUDA runtime do not mix) or with CUDA=0.
CUDA ?= $(if $(and $(NVCC),$(if $(SANITIZE),,1)),1,0)

LIB_SRCS :=
CUDA_SRCS :=
PROGS :=
TESTS :=
SHELL_TESTS :=
FUZZERS :=
BENCHES :=

include $(sort $(wildcard */module.mk))

ifeq ($(CUDA),1)
CPPFLAGS += -DDS_HAVE_CUDA=1 -I$(CUDA_HOME)/include
LDLIBS += -L$(CUDA_HOME)/lib64 -lcublasLt -lcublas -lcudart -lstdc++ $(CUDA_RPATH)
LIB_OBJS_CUDA := $(CUDA_SRCS:%.cu=$(BUILD)/obj/%.o)
else
LIB_OBJS_CUDA :=
endif

LIB_OBJS := $(LIB_SRCS:%.c=$(BUILD)/obj/%.o) $(LIB_OBJS_CUDA)
LIBDS := $(BUILD)/libds.a

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(@D)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@

$(LIBDS): $(LIB_OBJS)
	@mkdir -p $(@D)
	rm -f $@ && ar rcs $@ $^

# prog template: $(1) name; $(1)_SRCS sources; $(1)_OUT output path (default bin/)
define PROG_template
$(1)_OBJS := $$($(1)_SRCS:%.c=$(BUILD)/obj/%.o)
$(1)_BIN := $(BUILD)/$(or $($(1)_DIR),bin)/$(1)
$$($(1)_BIN): $$($(1)_OBJS) $(LIBDS) $$($(1)_DEPS)
	@mkdir -p $$(@D)
	$$(CC) $$(LDFLAGS) $$($(1)_LDFLAGS) -o $$@ $$($(1)_OBJS) $(LIBDS) $$($(1)_LDLIBS) $$(LDLIBS)
endef
$(foreach p,$(PROGS),$(eval $(call PROG_template,$(p))))
$(foreach t,$(TESTS),$(eval $(t)_DIR := tests)$(eval $(t)_LDLIBS += -lcmocka)$(eval $(call PROG_template,$(t))))
$(foreach b,$(BENCHES),$(eval $(b)_DIR := bench)$(eval $(call PROG_template,$(b))))

PROG_BINS := $(foreach p,$(PROGS),$($(p)_BIN))
TEST_BINS := $(foreach t,$(TESTS),$($(t)_BIN))
BENCH_BINS := $(foreach b,$(BENCHES),$($(b)_BIN))

all: $(PROG_BINS) $(TEST_BINS) $(BENCH_BINS) $(EXTRA_ALL)

deps:
	@./scripts/deps.sh

# Unit tests (cmocka, each prints its own summary), then shell/integration tests
# (each ends with "N passed, N failed"), then a short fuzzing pass.
check: deps
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory check-run

check-run:
	@set -o pipefail; fail=0; pass=0; \
	for t in $(TEST_BINS); do \
		echo "== $$t"; \
		if DS_BUILD=$(BUILD) $$t; then pass=$$((pass+1)); else rc=$$?; \
			if [ $$rc -eq 77 ]; then echo "   (skipped)"; else fail=$$((fail+1)); echo "FAILED: $$t"; fi; fi; \
	done; \
	for t in $(SHELL_TESTS); do \
		echo "== $$t"; \
		if DS_BUILD=$(BUILD) bash $$t; then pass=$$((pass+1)); else fail=$$((fail+1)); echo "FAILED: $$t"; fi; \
	done; \
	if [ -z "$(SANITIZE)" ] && [ "$(NOFUZZ)" != 1 ]; then \
		if $(MAKE) --no-print-directory fuzz-run; then pass=$$((pass+1)); else fail=$$((fail+1)); echo "FAILED: fuzz"; fi; \
	fi; \
	echo "check: $$pass suites passed, $$fail suites failed"; \
	echo "$$pass passed, $$fail failed"; \
	[ $$fail -eq 0 ]

# libFuzzer harnesses: clang, -fsanitize=fuzzer,address,undefined, LIB_SRCS compiled again.
FUZZ_BUILD ?= $(BUILD)-fuzz
FUZZ_CFLAGS := -std=c11 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	-I. -D_GNU_SOURCE -DDS_FUZZ=1 -Wall -Wextra -Werror -Wno-unused-parameter $(PKG_CFLAGS)
FUZZ_SECONDS ?= 15
define FUZZ_template
$(FUZZ_BUILD)/$(1): $$($(1)_SRCS) $$(LIB_SRCS) $$(wildcard */*.h)
	@mkdir -p $$(@D)
	clang $(FUZZ_CFLAGS) -fopenmp -o $$@ $$($(1)_SRCS) $$($(1)_LIBSRCS) -lm $$($(1)_LDLIBS)
endef
$(foreach f,$(FUZZERS),$(eval $(call FUZZ_template,$(f))))

fuzz: $(FUZZERS:%=$(FUZZ_BUILD)/%)

fuzz-run: fuzz
	@set -e; for f in $(FUZZERS); do \
		echo "== fuzz $$f ($(FUZZ_SECONDS)s)"; \
		mkdir -p $(FUZZ_BUILD)/corpus-$$f; \
		$(FUZZ_BUILD)/$$f -max_total_time=$(FUZZ_SECONDS) -print_final_stats=0 \
			$(FUZZ_BUILD)/corpus-$$f tests/fuzz/corpus/$$f 2>$(FUZZ_BUILD)/$$f.log \
			|| { tail -50 $(FUZZ_BUILD)/$$f.log; exit 1; }; \
		grep -E '^#[0-9]+.*DONE' $(FUZZ_BUILD)/$$f.log | tail -1 || true; \
	done

# Copies the shared libraries the GPU machine (Ubuntu 24.04) lacks next to the
# binaries ($(BUILD)/lib, found through the rpath) so the build folder can be carried.
BUNDLE_LIBS := libcjson.so.1 libinih.so.1 libcmocka.so.0 libpcre2-8.so.0 libgomp.so.1
bundle: all
	@mkdir -p $(BUILD)/lib
	@for l in $(BUNDLE_LIBS); do cp -L /usr/lib/x86_64-linux-gnu/$$l $(BUILD)/lib/; done

clean:
	rm -rf build build-san build-fuzz build-san-fuzz

.PHONY: bundle all deps check check-run fuzz fuzz-run clean

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

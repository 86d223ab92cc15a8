# daemon/: the dsd binary (offline verbs and `dsd serve`).
PROGS += dsd
dsd_SRCS := $(sort $(wildcard daemon/*.c))

# `make run`: the README's first command. Installs what is missing, builds,
# starts dsd on a private socket with the default model on the CPU, asks it
# one prompt through dsctl, prints the answer and stops the daemon.
RUN_MODEL ?= models/dsv3-tiny/bf16
RUN_PROMPT ?= Once upon a time
run: deps
	@$(MAKE) --no-print-directory $(BUILD)/bin/dsd $(BUILD)/bin/dsctl
	@set -e; test -d "$(RUN_MODEL)" || { echo "make run: the default model $(RUN_MODEL) is missing (train it with tools/train_tiny.py, or RUN_MODEL=DIR)" >&2; exit 1; }; \
	d=$$(mktemp -d); pid=; trap 'if [ -n "$$pid" ]; then kill $$pid; wait $$pid; fi 2>/dev/null; rm -rf "$$d"' EXIT; \
	$(BUILD)/bin/dsd serve --config /dev/null --model "$(RUN_MODEL)" --backend cpu --socket "$$d/dsd.sock" 2>"$$d/dsd.log" & pid=$$!; \
	for i in $$(seq 200); do [ -S "$$d/dsd.sock" ] && break; kill -0 $$pid 2>/dev/null || { cat "$$d/dsd.log" >&2; exit 1; }; sleep 0.05; done; \
	echo "dsd is serving $(RUN_MODEL) on $$d/dsd.sock (pid $$pid)"; \
	echo "\$$ dsctl run \"$(RUN_PROMPT)\""; \
	$(BUILD)/bin/dsctl --socket "$$d/dsd.sock" run --max-tokens 48 --verbose "$(RUN_PROMPT)"; \
	kill -TERM $$pid; wait $$pid; pid=; echo "dsd stopped (exit 0)"
.PHONY: run

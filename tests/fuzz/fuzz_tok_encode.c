/* libFuzzer: ds_tok_encode on arbitrary bytes with DeepSeek-V3's tokenizer when
 * ../shared/tokenizers/deepseek-v3 is there (the real regexes and 818 added tokens), else the
 * synthetic one. The first byte picks the flags. Invalid UTF-8 must give -EILSEQ; valid text
 * must decode back to itself, whole and through the streaming detokenizer. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/tok_internal.h"

static ds_tok *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char *paths[] = { "../shared/tokenizers/deepseek-v3/tokenizer.json",
				"tests/fixtures/tokenizer/synthetic/tokenizer.json" };
	for (size_t i = 0; i < 2 && !tok; i++) {
		ds_err e = { "" };
		if (access(paths[i], R_OK) == 0 && ds_tok_load(paths[i], &tok, &e))
			fprintf(stderr, "fuzz_tok_encode: %s\n", e.msg);
	}
	if (!tok) {
		fprintf(stderr, "fuzz_tok_encode: no tokenizer.json found (run from the repo root)\n");
		abort();
	}
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	unsigned flags = data[0] & 1 ? DS_TOK_NO_SPECIAL : 0;
	const char *text = (const char *)data + 1;
	size_t len = size - 1;
	int32_t *ids;
	size_t n;
	int rc = ds_tok_encode(tok, text, len, flags, &ids, &n, NULL);
	int valid = ds_tok_utf8_valid_prefix((const uint8_t *)text, len) == len;
	if (!valid) {
		if (rc != -EILSEQ)
			abort();
		return 0;
	}
	if (rc)
		abort();
	char *out;
	size_t ol;
	if (ds_tok_decode(tok, ids, n, 0, &out, &ol, NULL) || ol != len || memcmp(out, text, len))
		abort();
	ds_tok_stream *s;
	if (ds_tok_stream_new(tok, 0, &s, NULL))
		abort();
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		const char *p;
		size_t pl;
		if (ds_tok_stream_push(s, ids[i], &p, &pl, NULL) || k + pl > len ||
		    memcmp(text + k, p, pl))
			abort();
		k += pl;
	}
	const char *p;
	size_t pl;
	if (ds_tok_stream_flush(s, &p, &pl) || k + pl != len || memcmp(text + k, p, pl))
		abort();
	ds_tok_stream_free(s);
	free(out);
	free(ids);
	return 0;
}

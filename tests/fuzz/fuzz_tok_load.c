/* libFuzzer: the tokenizer.json loader on arbitrary bytes (seeded with small synthetic
 * tokenizers). A loaded tokenizer must then encode, decode and render without fault. */
#include <stdint.h>
#include <stdlib.h>

#include "model/chat_template.h"
#include "model/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	ds_tok *t;
	ds_err e;
	if (ds_tok_load_buffer((const char *)data, size, "fuzz", &t, &e))
		return 0;
	static const char *texts[] = { "hello world 12345", "<|s|>x  \n\n\t\xe4\xb8\xad\xe6\x96\x87",
				       "" };
	for (size_t i = 0; i < 3; i++)
		for (unsigned f = 0; f < 2; f++) {
			int32_t *ids;
			size_t n;
			if (ds_tok_encode(t, texts[i], __builtin_strlen(texts[i]), f, &ids, &n, NULL))
				continue;
			char *out;
			size_t len;
			if (!ds_tok_decode(t, ids, n, DS_TOK_SKIP_SPECIAL, &out, &len, NULL))
				free(out);
			free(ids);
		}
	size_t v = ds_tok_vocab_size(t);
	for (size_t id = 0; id < v && id < 4096; id++) {
		int32_t one = (int32_t)id;
		char *out;
		size_t len, pl;
		if (!ds_tok_decode(t, &one, 1, 0, &out, &len, NULL))
			free(out);
		const char *p = ds_tok_id_to_piece(t, one, &pl);
		if (p && ds_tok_piece_to_id(t, p, pl) < 0)
			abort();
	}
	ds_chat_msg m = { "user", "hi" };
	char *out;
	size_t len;
	if (!ds_chat_render(t, &m, 1, 1, &out, &len, NULL))
		free(out);
	ds_tok_free(t);
	return 0;
}

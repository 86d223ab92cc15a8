/* chat_template.c — DeepSeek-V3's Jinja chat template, as C. The template (tokenizer_config.json
 * of deepseek-ai/DeepSeek-V3) does, for system/user/assistant/tool messages:
 *   bos_token + all system contents joined by "\n\n"
 *   user:      "<｜User｜>" + content
 *   assistant: "<｜Assistant｜>" + content + "<｜end▁of▁sentence｜>", or right after tool
 *              outputs "<｜tool▁outputs▁end｜>" + content + "<｜end▁of▁sentence｜>"
 *   tool:      first of a run "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>" + content +
 *              "<｜tool▁output▁end｜>", later ones "\n<｜tool▁output▁begin｜>" + ... (the
 *              "first" flag is never reset, so later runs use the "\n" form too)
 *   end: "<｜tool▁outputs▁end｜>" if the last message was a tool output, else with
 *        add_generation_prompt "<｜Assistant｜>".
 * Assistant tool calls (content none) and roles the template ignores are refused instead. */
#include "model/chat_template.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* FNV-1a of DeepSeek-V3's chat_template text (2301 bytes). */
#define V3_TEMPLATE_FNV 0xebe3604156dc466aull
#define V3_TEMPLATE_LEN 2301

#define USER "<\xef\xbd\x9cUser\xef\xbd\x9c>"
#define ASSISTANT "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>"
#define EOS "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"
#define OUTS_BEGIN "<\xef\xbd\x9ctool\xe2\x96\x81outputs\xe2\x96\x81" "begin\xef\xbd\x9c>"
#define OUTS_END "<\xef\xbd\x9ctool\xe2\x96\x81outputs\xe2\x96\x81" "end\xef\xbd\x9c>"
#define OUT_BEGIN "<\xef\xbd\x9ctool\xe2\x96\x81output\xe2\x96\x81" "begin\xef\xbd\x9c>"
#define OUT_END "<\xef\xbd\x9ctool\xe2\x96\x81output\xe2\x96\x81" "end\xef\xbd\x9c>"

static uint64_t fnv1a(const char *s)
{
	uint64_t h = 0xcbf29ce484222325ull;
	for (; *s; s++)
		h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
	return h;
}

typedef struct sbuf {
	char *p;
	size_t n, cap;
	int oom;
} sbuf;

static void put(sbuf *b, const char *s, size_t n)
{
	if (b->oom)
		return;
	if (b->n + n + 1 > b->cap) {
		size_t c = 2 * (b->n + n + 1) + 256;
		char *np = realloc(b->p, c);
		if (!np) {
			b->oom = 1;
			return;
		}
		b->p = np;
		b->cap = c;
	}
	memcpy(b->p + b->n, s, n);
	b->n += n;
	b->p[b->n] = 0;
}

static void puts_(sbuf *b, const char *s)
{
	put(b, s, strlen(s));
}

int ds_chat_render(const ds_tok *tok, const ds_chat_msg *msgs, size_t n,
		   int add_generation_prompt, char **out, size_t *len, ds_err *e)
{
	if (!tok || !out || !len || (!msgs && n))
		return ds_errf(e, -EINVAL, "chat: NULL argument");
	const char *tmpl = ds_tok_chat_template(tok);
	if (!tmpl)
		return ds_errf(e, -ENOTSUP, "chat: the tokenizer has no chat_template "
			       "(tokenizer_config.json absent or without one)");
	if (strlen(tmpl) != V3_TEMPLATE_LEN || fnv1a(tmpl) != V3_TEMPLATE_FNV)
		return ds_errf(e, -ENOTSUP, "chat: chat_template is not DeepSeek-V3's, the only one "
			       "rendered natively");
	size_t bos_len;
	const char *bos = ds_tok_id_to_piece(tok, ds_tok_bos(tok), &bos_len);
	if (!bos)
		return ds_errf(e, -EINVAL, "chat: tokenizer_config.json names no bos_token");
	for (size_t i = 0; i < n; i++) {
		const char *r = msgs[i].role;
		if (!r || (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant") &&
			   strcmp(r, "tool")))
			return ds_errf(e, -EINVAL, "chat: message %zu has role \"%.32s\"; expected "
				       "system, user, assistant or tool", i, r ? r : "(null)");
		if (!msgs[i].content)
			return ds_errf(e, -EINVAL, "chat: message %zu (%s) has no content%s", i, r,
				       strcmp(r, "assistant") ? "" : " (tool calls are not supported)");
	}

	sbuf b = { 0 };
	put(&b, bos, bos_len);
	int first_sp = 1;
	for (size_t i = 0; i < n; i++)
		if (!strcmp(msgs[i].role, "system")) {
			if (!first_sp)
				puts_(&b, "\n\n");
			puts_(&b, msgs[i].content);
			first_sp = 0;
		}
	int is_tool = 0, output_first = 1;
	for (size_t i = 0; i < n; i++) {
		const char *r = msgs[i].role, *c = msgs[i].content;
		if (!strcmp(r, "user")) {
			is_tool = 0;
			puts_(&b, USER);
			puts_(&b, c);
		} else if (!strcmp(r, "assistant")) {
			puts_(&b, is_tool ? OUTS_END : ASSISTANT);
			puts_(&b, c);
			puts_(&b, EOS);
			is_tool = 0;
		} else if (!strcmp(r, "tool")) {
			is_tool = 1;
			puts_(&b, output_first ? OUTS_BEGIN OUT_BEGIN : "\n" OUT_BEGIN);
			puts_(&b, c);
			puts_(&b, OUT_END);
			output_first = 0;
		}
	}
	if (is_tool)
		puts_(&b, OUTS_END);
	else if (add_generation_prompt)
		puts_(&b, ASSISTANT);
	if (b.oom) {
		free(b.p);
		return ds_errf(e, -ENOMEM, "chat: out of memory");
	}
	*out = b.p;
	*len = b.n;
	return 0;
}

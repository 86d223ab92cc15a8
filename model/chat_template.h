/* chat_template.h — DeepSeek-V3's chat template, rendered natively in C.
 * Byte-identical to transformers' apply_chat_template(tokenize=False) with the template from
 * the model's tokenizer_config.json, which must be DeepSeek-V3's (recognized by its text).
 * Reads the ds_tok only; any thread. */
#ifndef DS_CHAT_TEMPLATE_H
#define DS_CHAT_TEMPLATE_H

#include <stddef.h>

#include "model/tokenizer.h"

typedef struct ds_chat_msg {
	const char *role;    /* "system", "user", "assistant" or "tool" */
	const char *content; /* UTF-8, NUL-terminated */
} ds_chat_msg;

/* Renders msgs into *out (malloc'd, NUL-terminated, *len bytes). -ENOTSUP when the tokenizer
 * has no chat template or one other than DeepSeek-V3's; -EINVAL for an unknown role or a
 * missing content (assistant tool calls are not supported). */
int ds_chat_render(const ds_tok *tok, const ds_chat_msg *msgs, size_t n,
		   int add_generation_prompt, char **out, size_t *len, ds_err *e);

#endif

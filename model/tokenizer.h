/* tokenizer.h — Hugging Face byte-level BPE tokenizers (tokenizer.json), as DeepSeek-V3 ships.
 * ds_tok_load builds an immutable ds_tok: once loaded it is read-only and may be shared by any
 * number of threads (encode/decode allocate per call). A ds_tok_stream belongs to one thread.
 * Ids match HF tokenizers' Tokenizer.encode(text, add_special_tokens=False): no BOS is added.
 * Functions return 0 or a negative errno and describe failures in the optional ds_err. */
#ifndef DS_TOKENIZER_H
#define DS_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "model/err.h"

typedef struct ds_tok ds_tok;
typedef struct ds_tok_stream ds_tok_stream;

enum {
	/* encode: match no added token (special or not) in the text; every byte goes through
	 * the pre-tokenizer and BPE, so untrusted text cannot inject control tokens. */
	DS_TOK_NO_SPECIAL = 1u << 0,
	/* decode / stream: leave out tokens marked "special" in added_tokens. */
	DS_TOK_SKIP_SPECIAL = 1u << 1,
};

/* Reads tokenizer.json. -ENOENT/-EIO when unreadable, -EINVAL when malformed,
 * -ENOTSUP for a model/pre-tokenizer/normalizer this implementation does not run. */
int ds_tok_load(const char *tokenizer_json_path, ds_tok **out, ds_err *e);
/* The same from tokenizer.json's text in memory; name is used in messages. */
int ds_tok_load_buffer(const char *json, size_t len, const char *name, ds_tok **out, ds_err *e);
/* Reads MODEL_DIR/tokenizer.json and, when present, MODEL_DIR/tokenizer_config.json
 * (bos/eos tokens, add_bos_token, chat_template). */
int ds_tok_load_dir(const char *model_dir, ds_tok **out, ds_err *e);
/* Accepts NULL; returns NULL. */
ds_tok *ds_tok_free(ds_tok *tok);

/* text[0..len) must be valid UTF-8 (-EILSEQ otherwise). *ids (malloc'd, caller frees) gets *n ids. */
int ds_tok_encode(const ds_tok *tok, const char *text, size_t len, unsigned flags,
		  int32_t **ids, size_t *n, ds_err *e);
/* Bytes of the tokens, invalid UTF-8 replaced by U+FFFD per maximal subpart (as HF does).
 * *text is malloc'd and NUL-terminated. -ERANGE for an id with no token. */
int ds_tok_decode(const ds_tok *tok, const int32_t *ids, size_t n, unsigned flags,
		  char **text, size_t *len, ds_err *e);

/* Streaming detokenizer: push ids one at a time; each push yields the text that is complete so
 * far (possibly empty), holding the bytes of an unfinished UTF-8 character until later ids
 * complete it. The concatenation of all pieces and the flush equals ds_tok_decode of all ids.
 * The returned pointer stays valid until the next call on the stream. */
int ds_tok_stream_new(const ds_tok *tok, unsigned flags, ds_tok_stream **out, ds_err *e);
int ds_tok_stream_push(ds_tok_stream *s, int32_t id, const char **text, size_t *len, ds_err *e);
int ds_tok_stream_flush(ds_tok_stream *s, const char **text, size_t *len);
ds_tok_stream *ds_tok_stream_free(ds_tok_stream *s);

/* One past the largest id. */
size_t ds_tok_vocab_size(const ds_tok *tok);
/* From tokenizer_config.json; -1 when unknown. */
int32_t ds_tok_bos(const ds_tok *tok);
int32_t ds_tok_eos(const ds_tok *tok);
/* tokenizer_config.json's add_bos_token (0 when absent). */
int ds_tok_add_bos(const ds_tok *tok);
/* The token's string as tokenizer.json spells it (byte-level form for BPE tokens, content for
 * added tokens); NULL for an id with no token. Not NUL-terminated: *len is set. */
const char *ds_tok_id_to_piece(const ds_tok *tok, int32_t id, size_t *len);
/* The id of an exact token string (vocab or added), or -1. */
int32_t ds_tok_piece_to_id(const ds_tok *tok, const char *piece, size_t len);
int ds_tok_is_special(const ds_tok *tok, int32_t id);
/* tokenizer_config.json's chat_template, or NULL. */
const char *ds_tok_chat_template(const ds_tok *tok);

#endif

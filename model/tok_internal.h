/* tok_internal.h — the layout of a loaded ds_tok, shared by tokenizer.c (loading),
 * tok_encode.c (added tokens, pre-tokenizer, BPE) and tok_decode.c (bytes, streaming).
 * Everything here is written once by ds_tok_load and only read afterwards. */
#ifndef DS_TOK_INTERNAL_H
#define DS_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdint.h>

#include "model/tokenizer.h"

#define TOK_MAX_STEPS 8

/* A string -> id table (open addressing, power-of-two size); entries point into ds_tok.strs.
 * A slot holds the hash's upper half beside the entry number, so most mismatches are rejected
 * without touching the entry or its string. */
typedef struct tok_strent {
	uint32_t off, len;
	int32_t id;
} tok_strent;

typedef struct tok_strmap {
	uint64_t *slot;	/* (hash >> 32) << 32 | (entry + 1); 0 = empty */
	uint32_t mask;
	tok_strent *e;
	uint32_t n;
} tok_strmap;

/* Trie of added tokens for leftmost-longest matching: edges in a hash keyed by (node, byte). */
typedef struct tok_trie {
	uint64_t *key;	   /* (node << 8 | byte) + 1; 0 = empty */
	uint32_t *child;
	uint32_t mask;
	int32_t *term;	   /* per node: token id ending here, or -1 */
	uint32_t n_nodes, cap_nodes;
	uint8_t first[256]; /* bytes that start some token */
} tok_trie;

struct ds_tok {
	/* Token strings (tokenizer.json spelling) and their decoded bytes, per id. */
	uint32_t n_ids;		/* one past the largest id */
	char *strs;		/* arena: vocab strings, then added tokens' contents */
	uint32_t *piece_off, *piece_len; /* per id, into strs; len UINT32_MAX = no token */
	uint8_t *bytes;		/* arena: what each id decodes to */
	uint32_t *bytes_off, *bytes_len;
	uint8_t *special;	/* per id: 1 = added token marked special */

	tok_strmap vocab;	/* model vocab: string -> id */
	tok_strmap added;	/* added tokens: content -> id */

	/* BPE merges: (left id, right id) -> rank and merged id. */
	uint64_t *merge_key;	/* (a << 32 | b) + 1; 0 = empty */
	uint64_t *merge_val;	/* rank << 32 | merged id */
	uint32_t merge_mask;
	int32_t byte_id[256];	/* id of each byte's byte-level character, -1 when absent */
	int32_t unk_id;
	int ignore_merges;

	/* Pre-tokenizer: regex splits (behavior Isolated), applied in order. */
	pcre2_code *step[TOK_MAX_STEPS];
	int n_steps;

	tok_trie trie_raw;	/* added tokens with normalized=false: matched first */
	tok_trie trie_norm;	/* normalized=true: matched in what is left */
	int n_added;

	int32_t bos, eos;
	int add_bos;
	char *chat_template;
};

uint64_t ds_tok_hash(const void *p, size_t n);
int32_t ds_tok_map_get(const ds_tok *t, const tok_strmap *m, const char *s, size_t n);
/* Validates UTF-8 strictly (no overlongs, surrogates or > U+10FFFF); returns the length of the
 * valid prefix. */
size_t ds_tok_utf8_valid_prefix(const uint8_t *s, size_t n);

#endif

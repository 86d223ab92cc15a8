/* tok_json.h — a small JSON reader for tokenizer.json: parses a caller-owned, writable,
 * NUL-terminated buffer in place (strings are unescaped where they lie) into one array of
 * nodes, so the 7.8 MB file loads without a malloc per value. Strings (and member names) are
 * NUL-terminated in the buffer, and also carry their length (a \u0000 escape stays a NUL). The document borrows the
 * buffer; both belong to the caller and to one thread while in use. */
#ifndef DS_TOK_JSON_H
#define DS_TOK_JSON_H

#include <stddef.h>
#include <stdint.h>

enum { TJ_NONE, TJ_NULL, TJ_FALSE, TJ_TRUE, TJ_NUM, TJ_STR, TJ_ARR, TJ_OBJ };

typedef struct tj_node tj_node;
struct tj_node {
	uint8_t type;
	uint32_t len;	  /* string bytes, or number of children */
	uint32_t key_len;
	const char *key;  /* member name when the parent is an object, else NULL */
	union {
		const char *s;	/* TJ_STR */
		double num;	/* TJ_NUM */
		tj_node *child; /* TJ_ARR / TJ_OBJ: first child or NULL */
	};
	tj_node *next;	  /* next sibling or NULL */
};

typedef struct tj_doc {
	tj_node *n; /* n[0] is the root */
	uint32_t count, cap;
} tj_doc;

/* buf[len] must be 0. Returns 0, or -EINVAL with the byte offset of the fault in *err_off,
 * or -ENOMEM. */
int tj_parse(char *buf, size_t len, tj_doc *doc, size_t *err_off);
void tj_free(tj_doc *doc);

/* The member of object o named key (the last one when repeated), or NULL; o may be NULL. */
const tj_node *tj_get(const tj_node *o, const char *key);
/* 1 when v is non-NULL and of that type. */
static inline int tj_is(const tj_node *v, int type)
{
	return v && v->type == type;
}
/* v's string when v is a string, else NULL. */
static inline const char *tj_str(const tj_node *v)
{
	return tj_is(v, TJ_STR) ? v->s : NULL;
}
#define tj_foreach(it, parent) \
	for (const tj_node *it = (parent) ? (parent)->child : NULL; it; it = it->next)

#endif

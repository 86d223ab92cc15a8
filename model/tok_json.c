/* tok_json.c — in-place JSON parser for tokenizer files (RFC 8259 grammar; strings are not
 * checked for valid UTF-8 here — the tokenizer validates what it uses). Recursion is bounded. */
#include "model/tok_json.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define TJ_MAX_DEPTH 128
/* While parsing, the node array may move, so links are kept as indices in the pointer fields
 * and turned into pointers once it is complete. */
#define IDX(i) ((tj_node *)(uintptr_t)(i))

typedef struct parser {
	char *p, *end, *base;
	tj_doc *d;
	int err;
} parser;

static uint32_t new_node(parser *P, uint8_t type)
{
	tj_doc *d = P->d;
	if (d->count == d->cap) {
		uint32_t nc = d->cap ? d->cap * 2 : 1024;
		if (nc <= d->cap) {
			P->err = -ENOMEM;
			return 0;
		}
		tj_node *nn = realloc(d->n, (size_t)nc * sizeof(*nn));
		if (!nn) {
			P->err = -ENOMEM;
			return 0;
		}
		d->n = nn;
		d->cap = nc;
	}
	tj_node *x = &d->n[d->count];
	x->type = type;
	x->len = 0;
	x->key = NULL;
	x->key_len = 0;
	x->child = NULL;
	x->next = NULL;
	return d->count++;
}

static void ws(parser *P)
{
	while (*P->p == ' ' || *P->p == '\n' || *P->p == '\r' || *P->p == '\t')
		P->p++;
}

static int hex4(const char *s, uint32_t *v)
{
	uint32_t x = 0;
	for (int i = 0; i < 4; i++) {
		char c = s[i];
		int h = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 :
			c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
		if (h < 0)
			return -1;
		x = x << 4 | (uint32_t)h;
	}
	*v = x;
	return 0;
}

/* At the opening quote; unescapes in place. Returns 0 and sets s and len, or -1. */
static int string(parser *P, const char **s, uint32_t *len)
{
	char *r = ++P->p, *w;
	/* Fast path: scan to the first quote, backslash or control byte. */
	while ((unsigned char)*r >= 0x20 && *r != '"' && *r != '\\')
		r++;
	w = r;
	while (*r != '"') {
		unsigned char c = (unsigned char)*r;
		if (c < 0x20 || r >= P->end)
			return -1;
		if (c != '\\') {
			*w++ = *r++;
			continue;
		}
		char k = r[1];
		r += 2;
		switch (k) {
		case '"': case '\\': case '/': *w++ = k; continue;
		case 'b': *w++ = '\b'; continue;
		case 'f': *w++ = '\f'; continue;
		case 'n': *w++ = '\n'; continue;
		case 'r': *w++ = '\r'; continue;
		case 't': *w++ = '\t'; continue;
		case 'u': break;
		default: return -1;
		}
		uint32_t cp, lo;
		if (hex4(r, &cp))
			return -1;
		r += 4;
		if (cp >= 0xd800 && cp < 0xdc00 && r[0] == '\\' && r[1] == 'u' && !hex4(r + 2, &lo) &&
		    lo >= 0xdc00 && lo < 0xe000) {
			cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
			r += 6;
		} else if (cp >= 0xd800 && cp < 0xe000) {
			return -1; /* a lone surrogate names no character */
		}
		if (cp < 0x80) {
			*w++ = (char)cp;
		} else if (cp < 0x800) {
			*w++ = (char)(0xc0 | cp >> 6);
			*w++ = (char)(0x80 | (cp & 0x3f));
		} else if (cp < 0x10000) {
			*w++ = (char)(0xe0 | cp >> 12);
			*w++ = (char)(0x80 | ((cp >> 6) & 0x3f));
			*w++ = (char)(0x80 | (cp & 0x3f));
		} else {
			*w++ = (char)(0xf0 | cp >> 18);
			*w++ = (char)(0x80 | ((cp >> 12) & 0x3f));
			*w++ = (char)(0x80 | ((cp >> 6) & 0x3f));
			*w++ = (char)(0x80 | (cp & 0x3f));
		}
	}
	*s = P->p;
	*len = (uint32_t)(w - P->p);
	*w = 0; /* at or before the closing quote, already read: strings end in a NUL */
	P->p = r + 1;
	return 0;
}

static int number(parser *P, double *v)
{
	char *s = P->p;
	int neg = *s == '-';
	s += neg;
	if (*s < '0' || *s > '9')
		return -1;
	uint64_t x = 0;
	int digits = 0;
	if (*s == '0')
		s++, digits = 1;
	else
		while (*s >= '0' && *s <= '9') {
			if (digits < 18)
				x = x * 10 + (uint64_t)(*s - '0');
			digits++;
			s++;
		}
	if (*s != '.' && *s != 'e' && *s != 'E' && digits <= 18) {
		*v = neg ? -(double)x : (double)x;
		P->p = s;
		return 0;
	}
	if (*s == '.') {
		s++;
		if (*s < '0' || *s > '9')
			return -1;
		while (*s >= '0' && *s <= '9')
			s++;
	}
	if (*s == 'e' || *s == 'E') {
		s++;
		if (*s == '+' || *s == '-')
			s++;
		if (*s < '0' || *s > '9')
			return -1;
		while (*s >= '0' && *s <= '9')
			s++;
	}
	*v = strtod(P->p, NULL); /* the grammar above was checked; strtod stops at s */
	P->p = s;
	return 0;
}

static uint32_t value(parser *P, int depth)
{
	ws(P);
	char c = *P->p;
	uint32_t i;
	if (c == '"') {
		const char *s;
		uint32_t len;
		if (string(P, &s, &len))
			return 0;
		if (!(i = new_node(P, TJ_STR)))
			return 0;
		P->d->n[i].s = s;
		P->d->n[i].len = len;
		return i;
	}
	if (c == '{' || c == '[') {
		if (depth >= TJ_MAX_DEPTH)
			return 0;
		int obj = c == '{';
		char close = obj ? '}' : ']';
		if (!(i = new_node(P, obj ? TJ_OBJ : TJ_ARR)))
			return 0;
		P->p++;
		ws(P);
		if (*P->p == close) {
			P->p++;
			return i;
		}
		uint32_t last = 0, count = 0;
		for (;;) {
			const char *key = NULL;
			uint32_t kl = 0;
			if (obj) {
				ws(P);
				if (*P->p != '"' || string(P, &key, &kl))
					return 0;
				ws(P);
				if (*P->p++ != ':')
					return 0;
			}
			uint32_t ch = value(P, depth + 1);
			if (!ch)
				return 0;
			P->d->n[ch].key = key;
			P->d->n[ch].key_len = kl;
			if (last)
				P->d->n[last].next = IDX(ch);
			else
				P->d->n[i].child = IDX(ch);
			last = ch;
			count++;
			ws(P);
			if (*P->p == ',') {
				P->p++;
				continue;
			}
			if (*P->p++ != close)
				return 0;
			P->d->n[i].len = count;
			return i;
		}
	}
	if (!strncmp(P->p, "true", 4)) {
		P->p += 4;
		return new_node(P, TJ_TRUE);
	}
	if (!strncmp(P->p, "false", 5)) {
		P->p += 5;
		return new_node(P, TJ_FALSE);
	}
	if (!strncmp(P->p, "null", 4)) {
		P->p += 4;
		return new_node(P, TJ_NULL);
	}
	double v;
	if (number(P, &v))
		return 0;
	if (!(i = new_node(P, TJ_NUM)))
		return 0;
	P->d->n[i].num = v;
	return i;
}

int tj_parse(char *buf, size_t len, tj_doc *doc, size_t *err_off)
{
	memset(doc, 0, sizeof(*doc));
	if (len >= UINT32_MAX / 2 || strlen(buf) != len) { /* an embedded NUL is not JSON */
		if (err_off)
			*err_off = strlen(buf);
		return -EINVAL;
	}
	parser P = { .p = buf, .end = buf + len, .base = buf, .d = doc };
	doc->cap = (uint32_t)(len / 24 + 16);
	doc->n = malloc((size_t)doc->cap * sizeof(tj_node));
	if (!doc->n)
		return -ENOMEM;
	new_node(&P, TJ_NONE);
	uint32_t root = value(&P, 0);
	if (root)
		ws(&P);
	if (root && P.p == P.end) {
		/* Node 0 was a placeholder so that index 0 could mean "none"; drop it. */
		for (uint32_t i = 1; i < doc->count; i++) {
			tj_node *x = &doc->n[i];
			uintptr_t nx = (uintptr_t)x->next;
			x->next = nx ? doc->n + (nx - 1) : NULL;
			if (x->type == TJ_ARR || x->type == TJ_OBJ) {
				uintptr_t c = (uintptr_t)x->child;
				x->child = c ? doc->n + (c - 1) : NULL;
			}
		}
		memmove(doc->n, doc->n + 1, (doc->count - 1) * sizeof(*doc->n));
		doc->count--;
	}
	if (!root || P.p != P.end) {
		if (err_off)
			*err_off = (size_t)(P.p - buf);
		int rc = P.err ? P.err : -EINVAL;
		tj_free(doc);
		return rc;
	}
	return 0;
}

void tj_free(tj_doc *doc)
{
	free(doc->n);
	memset(doc, 0, sizeof(*doc));
}

const tj_node *tj_get(const tj_node *o, const char *key)
{
	if (!tj_is(o, TJ_OBJ))
		return NULL;
	size_t kl = strlen(key);
	const tj_node *found = NULL;
	for (const tj_node *c = o->child; c; c = c->next)
		if (c->key_len == kl && !memcmp(c->key, key, kl))
			found = c;
	return found;
}

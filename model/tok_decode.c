/* tok_decode.c — ids -> text: the tokens' bytes joined, then invalid UTF-8 replaced by U+FFFD
 * per maximal subpart (Unicode ch. 3; what Rust's from_utf8_lossy and so HF tokenizers do).
 * The streaming detokenizer runs the same scan but holds back an unfinished character, so the
 * pieces it yields always add up to the whole decode. A ds_tok_stream belongs to one thread. */
#include "model/tok_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static const char REPL[3] = { (char)0xef, (char)0xbf, (char)0xbd };

/* Length of the valid or maximal-invalid unit at s[0..n): *valid says which; *partial is set
 * when the unit is a valid prefix cut short by the end of the input. */
static size_t utf8_unit(const uint8_t *s, size_t n, int *valid, int *partial)
{
	uint8_t c = s[0], lo = 0x80, hi = 0xbf;
	size_t k;
	*partial = 0;
	if (c < 0x80) {
		*valid = 1;
		return 1;
	}
	if (c >= 0xc2 && c <= 0xdf)
		k = 2;
	else if (c >= 0xe0 && c <= 0xef) {
		k = 3;
		lo = c == 0xe0 ? 0xa0 : 0x80;
		hi = c == 0xed ? 0x9f : 0xbf;
	} else if (c >= 0xf0 && c <= 0xf4) {
		k = 4;
		lo = c == 0xf0 ? 0x90 : 0x80;
		hi = c == 0xf4 ? 0x8f : 0xbf;
	} else {
		*valid = 0;
		return 1;
	}
	for (size_t j = 1; j < k; j++) {
		if (j >= n) {
			*valid = 0;
			*partial = 1;
			return j;
		}
		uint8_t b = s[j];
		if (j == 1 ? (b < lo || b > hi) : (b & 0xc0) != 0x80) {
			*valid = 0;
			return j;
		}
	}
	*valid = 1;
	return k;
}

/* Appends the lossy conversion of in[0..n) to out (room for 3 * n bytes needed); returns the
 * bytes written. With hold, a partial character at the end is not converted: *held gets its
 * length. */
static size_t lossy(const uint8_t *in, size_t n, char *out, int hold, size_t *held)
{
	size_t i = 0, o = 0;
	*held = 0;
	while (i < n) {
		int valid, partial;
		size_t u = utf8_unit(in + i, n - i, &valid, &partial);
		if (partial && hold) {
			*held = n - i;
			break;
		}
		if (valid)
			memcpy(out + o, in + i, u), o += u;
		else
			memcpy(out + o, REPL, 3), o += 3;
		i += u;
	}
	return o;
}

static int id_bytes(const ds_tok *t, int32_t id, unsigned flags, const uint8_t **b, size_t *n,
		    ds_err *e)
{
	if (id < 0 || (uint32_t)id >= t->n_ids || t->piece_len[id] == UINT32_MAX)
		return ds_errf(e, -ERANGE, "decode: id %d is not a token (vocabulary size %u)", id,
			       t->n_ids);
	if ((flags & DS_TOK_SKIP_SPECIAL) && t->special[id]) {
		*n = 0;
		return 0;
	}
	*b = t->bytes + t->bytes_off[id];
	*n = t->bytes_len[id];
	return 0;
}

int ds_tok_decode(const ds_tok *t, const int32_t *ids, size_t n, unsigned flags, char **text,
		  size_t *len, ds_err *e)
{
	if (!t || !text || !len || (!ids && n))
		return ds_errf(e, -EINVAL, "decode: NULL argument");
	size_t total = 0;
	for (size_t i = 0; i < n; i++) {
		const uint8_t *b;
		size_t k;
		int rc = id_bytes(t, ids[i], flags, &b, &k, e);
		if (rc)
			return rc;
		total += k;
	}
	uint8_t *raw = malloc(total + 1);
	char *out = malloc(3 * total + 1);
	if (!raw || !out) {
		free(raw);
		free(out);
		return ds_errf(e, -ENOMEM, "decode: out of memory");
	}
	size_t o = 0, held;
	for (size_t i = 0; i < n; i++) {
		const uint8_t *b;
		size_t k;
		id_bytes(t, ids[i], flags, &b, &k, NULL);
		memcpy(raw + o, b, k);
		o += k;
	}
	o = lossy(raw, total, out, 0, &held);
	free(raw);
	out[o] = 0;
	char *shrunk = realloc(out, o + 1);
	*text = shrunk ? shrunk : out;
	*len = o;
	return 0;
}

struct ds_tok_stream {
	const ds_tok *tok;
	unsigned flags;
	uint8_t held[4];
	size_t n_held;
	char *buf;	/* the last piece returned */
	size_t cap;
	uint8_t *raw;
	size_t raw_cap;
};

int ds_tok_stream_new(const ds_tok *t, unsigned flags, ds_tok_stream **out, ds_err *e)
{
	if (!t || !out)
		return ds_errf(e, -EINVAL, "stream: NULL argument");
	ds_tok_stream *s = calloc(1, sizeof(*s));
	if (!s)
		return ds_errf(e, -ENOMEM, "stream: out of memory");
	s->tok = t;
	s->flags = flags;
	*out = s;
	return 0;
}

ds_tok_stream *ds_tok_stream_free(ds_tok_stream *s)
{
	if (s) {
		free(s->buf);
		free(s->raw);
		free(s);
	}
	return NULL;
}

static int grow(void **p, size_t *cap, size_t need)
{
	if (need <= *cap)
		return 0;
	size_t c = need + need / 2 + 64;
	void *n = realloc(*p, c);
	if (!n)
		return -ENOMEM;
	*p = n;
	*cap = c;
	return 0;
}

int ds_tok_stream_push(ds_tok_stream *s, int32_t id, const char **text, size_t *len, ds_err *e)
{
	const uint8_t *b;
	size_t k;
	int rc = id_bytes(s->tok, id, s->flags, &b, &k, e);
	if (rc)
		return rc;
	size_t n = s->n_held + k;
	if (grow((void **)&s->raw, &s->raw_cap, n) || grow((void **)&s->buf, &s->cap, 3 * n + 1))
		return ds_errf(e, -ENOMEM, "stream: out of memory");
	if (!n) { /* a skipped special token with nothing held */
		*text = "";
		*len = 0;
		return 0;
	}
	memcpy(s->raw, s->held, s->n_held);
	memcpy(s->raw + s->n_held, b, k);
	size_t held, o = lossy(s->raw, n, s->buf, 1, &held);
	memcpy(s->held, s->raw + n - held, held);
	s->n_held = held;
	s->buf[o] = 0;
	*text = s->buf;
	*len = o;
	return 0;
}

int ds_tok_stream_flush(ds_tok_stream *s, const char **text, size_t *len)
{
	if (grow((void **)&s->buf, &s->cap, 3 * s->n_held + 1))
		return -ENOMEM;
	size_t held, o = lossy(s->held, s->n_held, s->buf, 0, &held);
	s->n_held = 0;
	s->buf[o] = 0;
	*text = s->buf;
	*len = o;
	return 0;
}

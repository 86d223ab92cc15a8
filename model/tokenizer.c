/* tokenizer.c — loading tokenizer.json (+ tokenizer_config.json) into an immutable ds_tok.
 * Supports what byte-level BPE tokenizers such as DeepSeek-V3's use; anything else is refused
 * with -ENOTSUP and a message naming it, rather than tokenized differently from HF. */
#include "model/tok_internal.h"
#include "model/tok_json.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Ids above this are refused: they would only make the per-id tables huge. */
#define TOK_MAX_ID (1u << 24)
/* The largest tokenizer.json read (the 128K-vocabulary one is 7.8 MB). */
#define TOK_MAX_FILE (512u << 20)

uint64_t ds_tok_hash(const void *p, size_t n)
{
	const uint8_t *s = p;
	uint64_t h = 0x9e3779b97f4a7c15ull ^ (n * 0xff51afd7ed558ccdull);
	while (n >= 8) {
		uint64_t w;
		memcpy(&w, s, 8);
		h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
		h ^= h >> 31;
		s += 8;
		n -= 8;
	}
	uint64_t w = 0;
	if (n >= 4) { /* two overlapping loads cover 4..7 bytes */
		uint32_t lo, hi;
		memcpy(&lo, s, 4);
		memcpy(&hi, s + n - 4, 4);
		w = (uint64_t)lo << 32 | hi;
	} else if (n) {
		w = (uint64_t)s[0] << 16 | (uint64_t)s[n >> 1] << 8 | s[n - 1];
	}
	h = (h ^ w) * 0x94d049bb133111ebull;
	h ^= h >> 29;
	return h;
}

/* ---- string map ---------------------------------------------------------------------- */

static int strmap_init(tok_strmap *m, uint32_t n)
{
	uint32_t cap = 16;
	while (cap < 2 * n + 16)
		cap <<= 1;
	m->slot = calloc(cap, sizeof(*m->slot));
	m->e = malloc((n + 1) * sizeof(*m->e));
	m->mask = cap - 1;
	m->n = 0;
	return m->slot && m->e ? 0 : -ENOMEM;
}

static void strmap_free(tok_strmap *m)
{
	free(m->slot);
	free(m->e);
}

/* Inserts strs[off..off+len) (whose hash is h) -> id; returns the id already there for a
 * duplicate. */
static int32_t strmap_put_h(const char *strs, tok_strmap *m, uint32_t off, uint32_t len,
			    int32_t id, uint64_t h)
{
	uint64_t tag = h >> 32 << 32;
	uint32_t i = (uint32_t)h & m->mask;
	for (;; i = (i + 1) & m->mask) {
		uint64_t s = m->slot[i];
		if (!s)
			break;
		if ((s & ~0xffffffffull) != tag)
			continue;
		const tok_strent *x = &m->e[(uint32_t)s - 1];
		if (x->len == len && !memcmp(strs + x->off, strs + off, len))
			return x->id;
	}
	m->e[m->n] = (tok_strent){ off, len, id };
	m->slot[i] = tag | ++m->n;
	return -1;
}

static int32_t strmap_put(const char *strs, tok_strmap *m, uint32_t off, uint32_t len, int32_t id)
{
	return strmap_put_h(strs, m, off, len, id, ds_tok_hash(strs + off, len));
}

int32_t ds_tok_map_get(const ds_tok *t, const tok_strmap *m, const char *s, size_t n)
{
	if (!m->slot)
		return -1;
	uint64_t h = ds_tok_hash(s, n), tag = h >> 32 << 32;
	uint32_t i = (uint32_t)h & m->mask;
	for (;; i = (i + 1) & m->mask) {
		uint64_t v = m->slot[i];
		if (!v)
			return -1;
		if ((v & ~0xffffffffull) != tag)
			continue;
		const tok_strent *x = &m->e[(uint32_t)v - 1];
		if (x->len == n && !memcmp(t->strs + x->off, s, n))
			return x->id;
	}
}

/* Many lookups at once. Each one is three dependent cache misses (slot, entry, string) on
 * tables far larger than the caches, so they are software-pipelined: item i+3D's slot, i+2D's
 * entry and i+D's string are prefetched while item i is compared. */
#define MG_D 8
static void strmap_get_many(const ds_tok *t, const tok_strmap *m, size_t n,
			    const char *const *s, const uint32_t *len, int32_t *out)
{
	uint64_t hh[4 * MG_D];	/* ring of hashes, indexed by item mod 4D */
	uint32_t cand[4 * MG_D]; /* candidate entry + 1, 0 = none, UINT32_MAX = not found */
	for (size_t i = 0; i < n + 3 * MG_D; i++) {
		size_t a = i, b = i - MG_D, c = i - 2 * MG_D, d = i - 3 * MG_D;
		if (a < n) {
			uint64_t h = ds_tok_hash(s[a], len[a]);
			hh[a % (4 * MG_D)] = h;
			__builtin_prefetch(&m->slot[(uint32_t)h & m->mask]);
		}
		if (i >= MG_D && b < n) {
			uint64_t h = hh[b % (4 * MG_D)], tag = h >> 32 << 32, v;
			uint32_t x = (uint32_t)h & m->mask, r = UINT32_MAX;
			while ((v = m->slot[x])) {
				if ((v & ~0xffffffffull) == tag) {
					r = (uint32_t)v;
					__builtin_prefetch(&m->e[r - 1]);
					break;
				}
				x = (x + 1) & m->mask;
			}
			cand[b % (4 * MG_D)] = r;
		}
		if (i >= 2 * MG_D && c < n) {
			uint32_t r = cand[c % (4 * MG_D)];
			if (r != UINT32_MAX)
				__builtin_prefetch(t->strs + m->e[r - 1].off);
		}
		if (i >= 3 * MG_D && d < n) {
			uint32_t r = cand[d % (4 * MG_D)];
			if (r == UINT32_MAX)
				out[d] = -1;
			else if (m->e[r - 1].len == len[d] &&
				 !memcmp(t->strs + m->e[r - 1].off, s[d], len[d]))
				out[d] = m->e[r - 1].id;
			else /* a tag collision: look further the slow way */
				out[d] = ds_tok_map_get(t, m, s[d], len[d]);
		}
	}
}

/* ---- byte-level alphabet (GPT-2's bytes_to_unicode) ---------------------------------- */

/* The code point that stands for byte b in byte-level token strings. */
static uint32_t byte_char(int b)
{
	if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255))
		return (uint32_t)b;
	int n = 0;
	for (int c = 0; c < b; c++)
		if (!((c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255)))
			n++;
	return 256u + (uint32_t)n;
}

static int utf8_put(char *o, uint32_t c)
{
	if (c < 0x80) {
		o[0] = (char)c;
		return 1;
	}
	if (c < 0x800) {
		o[0] = (char)(0xc0 | c >> 6);
		o[1] = (char)(0x80 | (c & 0x3f));
		return 2;
	}
	o[0] = (char)(0xe0 | c >> 12);
	o[1] = (char)(0x80 | ((c >> 6) & 0x3f));
	o[2] = (char)(0x80 | (c & 0x3f));
	return 3;
}

size_t ds_tok_utf8_valid_prefix(const uint8_t *s, size_t n)
{
	size_t i = 0;
	while (i < n) {
		uint8_t c = s[i];
		if (c < 0x80) {
			i++;
			continue;
		}
		size_t k;
		uint8_t lo = 0x80, hi = 0xbf;
		if (c >= 0xc2 && c <= 0xdf)
			k = 1;
		else if (c >= 0xe0 && c <= 0xef) {
			k = 2;
			if (c == 0xe0)
				lo = 0xa0;
			else if (c == 0xed)
				hi = 0x9f;
		} else if (c >= 0xf0 && c <= 0xf4) {
			k = 3;
			if (c == 0xf0)
				lo = 0x90;
			else if (c == 0xf4)
				hi = 0x8f;
		} else
			return i;
		if (i + k >= n)
			return i;
		if (s[i + 1] < lo || s[i + 1] > hi)
			return i;
		for (size_t j = 2; j <= k; j++)
			if ((s[i + j] & 0xc0) != 0x80)
				return i;
		i += k + 1;
	}
	return n;
}

/* ---- loading ------------------------------------------------------------------------- */

static int read_file(const char *path, char **buf, size_t *len, ds_err *e)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return ds_errf(e, -errno, "%s: %s", path, strerror(errno));
	struct stat st;
	if (fstat(fileno(f), &st) || !S_ISREG(st.st_mode)) {
		fclose(f);
		return ds_errf(e, -EINVAL, "%s: not a regular file", path);
	}
	if ((uint64_t)st.st_size > TOK_MAX_FILE) {
		fclose(f);
		return ds_errf(e, -EFBIG, "%s: %lld bytes, larger than the %u allowed", path,
			       (long long)st.st_size, TOK_MAX_FILE);
	}
	char *b = malloc((size_t)st.st_size + 1);
	if (!b) {
		fclose(f);
		return ds_errf(e, -ENOMEM, "%s: out of memory", path);
	}
	size_t n = fread(b, 1, (size_t)st.st_size, f);
	int bad = ferror(f);
	fclose(f);
	if (bad || n != (size_t)st.st_size) {
		free(b);
		return ds_errf(e, -EIO, "%s: read error", path);
	}
	b[n] = 0;
	*buf = b;
	*len = n;
	return 0;
}

static const char *jstr(const tj_node *o, const char *key)
{
	const tj_node *v = tj_get(o, key);
	return tj_is(v, TJ_STR) ? v->s : NULL;
}

/* 1 when the member is true, 0 when false/null/absent, -1 when present with another type. */
static int jbool(const tj_node *o, const char *key)
{
	const tj_node *v = tj_get(o, key);
	if (!v || tj_is(v, TJ_NULL) || tj_is(v, TJ_FALSE))
		return 0;
	return tj_is(v, TJ_TRUE) ? 1 : -1;
}

static int jid(const tj_node *v, uint32_t *id)
{
	if (!tj_is(v, TJ_NUM) || v->num < 0 || v->num >= TOK_MAX_ID ||
	    v->num != (double)(uint32_t)v->num)
		return -1;
	*id = (uint32_t)v->num;
	return 0;
}

static int trie_init(tok_trie *t)
{
	memset(t, 0, sizeof(*t));
	t->cap_nodes = 64;
	t->term = malloc(t->cap_nodes * sizeof(*t->term));
	t->mask = 255;
	t->key = calloc(t->mask + 1, sizeof(*t->key));
	t->child = calloc(t->mask + 1, sizeof(*t->child));
	if (!t->term || !t->key || !t->child)
		return -ENOMEM;
	t->term[0] = -1;
	t->n_nodes = 1;
	return 0;
}

static void trie_free(tok_trie *t)
{
	free(t->key);
	free(t->child);
	free(t->term);
}

static uint32_t trie_slot(const tok_trie *t, uint64_t k)
{
	uint32_t i = (uint32_t)((k * 0x9e3779b97f4a7c15ull) >> 40) & t->mask;
	while (t->key[i] && t->key[i] != k)
		i = (i + 1) & t->mask;
	return i;
}

static int trie_grow(tok_trie *t)
{
	uint32_t ncap = (t->mask + 1) * 2;
	tok_trie n = *t;
	n.mask = ncap - 1;
	n.key = calloc(ncap, sizeof(*n.key));
	n.child = calloc(ncap, sizeof(*n.child));
	if (!n.key || !n.child) {
		free(n.key);
		free(n.child);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i <= t->mask; i++)
		if (t->key[i]) {
			uint32_t j = trie_slot(&n, t->key[i]);
			n.key[j] = t->key[i];
			n.child[j] = t->child[i];
		}
	free(t->key);
	free(t->child);
	t->key = n.key;
	t->child = n.child;
	t->mask = n.mask;
	return 0;
}

static int trie_add(tok_trie *t, const uint8_t *s, size_t n, int32_t id)
{
	uint32_t node = 0;
	t->first[s[0]] = 1;
	for (size_t i = 0; i < n; i++) {
		uint64_t k = ((uint64_t)node << 8 | s[i]) + 1;
		uint32_t j = trie_slot(t, k);
		if (t->key[j]) {
			node = t->child[j];
			continue;
		}
		if (2 * (t->n_nodes + 1) > t->mask) {
			if (trie_grow(t))
				return -ENOMEM;
			j = trie_slot(t, k);
		}
		if (t->n_nodes == t->cap_nodes) {
			int32_t *nt = realloc(t->term, 2 * t->cap_nodes * sizeof(*nt));
			if (!nt)
				return -ENOMEM;
			t->term = nt;
			t->cap_nodes *= 2;
		}
		t->term[t->n_nodes] = -1;
		t->key[j] = k;
		t->child[j] = t->n_nodes;
		node = t->n_nodes++;
	}
	/* Two added tokens with one content: the later wins, as in HF's map. */
	t->term[node] = id;
	return 0;
}

static void merge_prefetch(const ds_tok *t, int32_t a, int32_t b)
{
	uint64_t k = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
	uint32_t i = (uint32_t)((k * 0x9e3779b97f4a7c15ull) >> 32) & t->merge_mask;
	__builtin_prefetch(&t->merge_key[i]);
	__builtin_prefetch(&t->merge_val[i]);
}

static int merge_put(ds_tok *t, int32_t a, int32_t b, uint32_t rank, int32_t m)
{
	uint64_t k = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
	uint32_t i = (uint32_t)((k * 0x9e3779b97f4a7c15ull) >> 32) & t->merge_mask;
	while (t->merge_key[i] && t->merge_key[i] != k)
		i = (i + 1) & t->merge_mask;
	t->merge_key[i] = k; /* a repeated pair takes the later rank, as HF's map does */
	t->merge_val[i] = (uint64_t)rank << 32 | (uint32_t)m;
	return 0;
}

static int compile_step(ds_tok *t, const char *re, size_t len, uint32_t opts, const char *path,
			ds_err *e)
{
	if (t->n_steps == TOK_MAX_STEPS)
		return ds_errf(e, -ENOTSUP, "%s: more than %d pre-tokenizer splits", path,
			       TOK_MAX_STEPS);
	int err;
	PCRE2_SIZE off;
	pcre2_code *c = pcre2_compile((PCRE2_SPTR)re, len, PCRE2_UTF | PCRE2_UCP | opts, &err,
				      &off, NULL);
	if (!c) {
		char msg[128];
		pcre2_get_error_message(err, (PCRE2_UCHAR *)msg, sizeof(msg));
		return ds_errf(e, -EINVAL, "%s: pre-tokenizer regex at offset %zu: %s", path,
			       (size_t)off, msg);
	}
	pcre2_jit_compile(c, PCRE2_JIT_COMPLETE); /* the interpreter runs where JIT is missing */
	t->step[t->n_steps++] = c;
	return 0;
}

static const char GPT2_SPLIT[] =
	"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int load_pretok_one(ds_tok *t, const tj_node *p, const char *path, ds_err *e)
{
	const char *type = jstr(p, "type");
	if (!type)
		return ds_errf(e, -EINVAL, "%s: pre_tokenizer without a type", path);
	if (!strcmp(type, "Split")) {
		const char *beh = jstr(p, "behavior");
		if (!beh || strcmp(beh, "Isolated") || jbool(p, "invert"))
			return ds_errf(e, -ENOTSUP, "%s: Split pre-tokenizer with behavior %s%s: only "
				       "Isolated without invert is supported", path, beh ? beh : "(none)",
				       jbool(p, "invert") ? " and invert" : "");
		const tj_node *pat = tj_get(p, "pattern");
		const char *re = jstr(pat, "Regex"), *lit = jstr(pat, "String");
		if (re)
			return compile_step(t, re, strlen(re), 0, path, e);
		if (lit && *lit)
			return compile_step(t, lit, strlen(lit), PCRE2_LITERAL, path, e);
		return ds_errf(e, -EINVAL, "%s: Split pre-tokenizer without a Regex or String pattern",
			       path);
	}
	if (!strcmp(type, "ByteLevel")) {
		if (jbool(p, "add_prefix_space"))
			return ds_errf(e, -ENOTSUP, "%s: ByteLevel pre-tokenizer with add_prefix_space",
				       path);
		const tj_node *ur = tj_get(p, "use_regex");
		if (!ur || tj_is(ur, TJ_TRUE)) /* HF's default is true */
			return compile_step(t, GPT2_SPLIT, sizeof(GPT2_SPLIT) - 1, 0, path, e);
		return 0;
	}
	return ds_errf(e, -ENOTSUP, "%s: pre-tokenizer type %s is not supported", path, type);
}

static int load_pretok(ds_tok *t, const tj_node *root, const char *path, ds_err *e)
{
	const tj_node *p = tj_get(root, "pre_tokenizer");
	if (!p || tj_is(p, TJ_NULL))
		return 0;
	if (!tj_is(p, TJ_OBJ))
		return ds_errf(e, -EINVAL, "%s: pre_tokenizer is not an object", path);
	const char *type = jstr(p, "type");
	if (type && !strcmp(type, "Sequence")) {
		const tj_node *l = tj_get(p, "pretokenizers");
		if (!tj_is(l, TJ_ARR))
			return ds_errf(e, -EINVAL, "%s: Sequence pre_tokenizer without pretokenizers",
				       path);
		tj_foreach(s, l) {
			if (!tj_is(s, TJ_OBJ))
				return ds_errf(e, -EINVAL, "%s: pre-tokenizer entry is not an object",
					       path);
			int rc = load_pretok_one(t, s, path, e);
			if (rc)
				return rc;
		}
		return 0;
	}
	return load_pretok_one(t, p, path, e);
}

/* Only what leaves text and bytes unchanged is accepted: an empty normalizer, a ByteLevel
 * decoder. */
static int check_other_parts(const tj_node *root, const char *path, ds_err *e)
{
	const tj_node *n = tj_get(root, "normalizer");
	if (n && !tj_is(n, TJ_NULL)) {
		const char *type = jstr(n, "type");
		const tj_node *l = tj_get(n, "normalizers");
		if (!type || strcmp(type, "Sequence") || !tj_is(l, TJ_ARR) || l->len)
			return ds_errf(e, -ENOTSUP, "%s: normalizer %s is not supported (only none or "
				       "an empty Sequence)", path, type ? type : "(untyped)");
	}
	const tj_node *d = tj_get(root, "decoder");
	const char *dt = jstr(d, "type");
	if (!dt || strcmp(dt, "ByteLevel"))
		return ds_errf(e, -ENOTSUP, "%s: decoder %s is not supported (only ByteLevel)", path,
			       dt ? dt : "(none)");
	return 0;
}

static int load_model_opts(ds_tok *t, const tj_node *model, const char *path, ds_err *e)
{
	const char *type = jstr(model, "type");
	if (type && strcmp(type, "BPE"))
		return ds_errf(e, -ENOTSUP, "%s: model type %s is not supported (only BPE)", path,
			       type);
	const tj_node *d = tj_get(model, "dropout");
	if (d && !tj_is(d, TJ_NULL) && !(tj_is(d, TJ_NUM) && d->num == 0))
		return ds_errf(e, -ENOTSUP, "%s: BPE dropout is not supported", path);
	if (jstr(model, "continuing_subword_prefix") || jstr(model, "end_of_word_suffix"))
		return ds_errf(e, -ENOTSUP, "%s: BPE with a subword prefix/suffix is not supported",
			       path);
	if (jbool(model, "byte_fallback") || jbool(model, "fuse_unk"))
		return ds_errf(e, -ENOTSUP, "%s: BPE byte_fallback/fuse_unk is not supported", path);
	int im = jbool(model, "ignore_merges");
	if (im < 0)
		return ds_errf(e, -EINVAL, "%s: ignore_merges is not a boolean", path);
	t->ignore_merges = im;
	return 0;
}

/* A merge's two token strings: "a b" (exactly one space) or ["a", "b"]. 0 or -1. */
static int merge_parts(const tj_node *it, const char **a, size_t *la, const char **b, size_t *lb)
{
	if (tj_is(it, TJ_STR)) {
		const char *sp = memchr(it->s, ' ', it->len);
		if (!sp || memchr(sp + 1, ' ', it->len - (size_t)(sp + 1 - it->s)))
			return -1;
		*a = it->s;
		*la = (size_t)(sp - it->s);
		*b = sp + 1;
		*lb = it->len - *la - 1;
		return 0;
	}
	if (tj_is(it, TJ_ARR) && it->len == 2 && tj_is(it->child, TJ_STR) &&
	    tj_is(it->child->next, TJ_STR)) {
		*a = it->child->s;
		*la = it->child->len;
		*b = it->child->next->s;
		*lb = it->child->next->len;
		return 0;
	}
	return -1;
}

static int load_json(ds_tok *t, const tj_node *root, const char *path, ds_err *e)
{
	if (!tj_is(root, TJ_OBJ))
		return ds_errf(e, -EINVAL, "%s: not a JSON object", path);
	const tj_node *model = tj_get(root, "model");
	if (!tj_is(model, TJ_OBJ))
		return ds_errf(e, -EINVAL, "%s: no \"model\" object", path);
	int rc = load_model_opts(t, model, path, e);
	if (rc)
		return rc;
	const tj_node *vocab = tj_get(model, "vocab");
	const tj_node *merges = tj_get(model, "merges");
	const tj_node *added = tj_get(root, "added_tokens");
	if (!tj_is(vocab, TJ_OBJ))
		return ds_errf(e, -EINVAL, "%s: model.vocab is not an object", path);
	if (merges && !tj_is(merges, TJ_ARR))
		return ds_errf(e, -EINVAL, "%s: model.merges is not an array", path);
	if (added && !tj_is(added, TJ_NULL) && !tj_is(added, TJ_ARR))
		return ds_errf(e, -EINVAL, "%s: added_tokens is not an array", path);
	if ((rc = check_other_parts(root, path, e)))
		return rc;

	/* Sizes first: ids, string bytes. */
	uint32_t n_vocab = 0, max_id = 0, n_added = 0;
	size_t str_bytes = 0;
	tj_foreach(it, vocab) {
		uint32_t id;
		if (jid(it, &id))
			return ds_errf(e, -EINVAL, "%s: vocab entry \"%.64s\" has no valid id", path,
				       it->key);
		max_id = id > max_id ? id : max_id;
		str_bytes += it->key_len;
		n_vocab++;
	}
	if (tj_is(added, TJ_ARR))
		tj_foreach(it, added) {
			uint32_t id;
			const char *c = jstr(it, "content");
			if (!tj_is(it, TJ_OBJ) || !c || !*c ||
			    jid(tj_get(it, "id"), &id))
				return ds_errf(e, -EINVAL, "%s: added_tokens[%u] needs a non-empty "
					       "content and a valid id", path, n_added);
			if (jbool(it, "lstrip") || jbool(it, "rstrip") || jbool(it, "single_word"))
				return ds_errf(e, -ENOTSUP, "%s: added token %.64s uses lstrip/rstrip/"
					       "single_word, which is not supported", path, c);
			max_id = id > max_id ? id : max_id;
			str_bytes += strlen(c);
			n_added++;
		}
	if (!n_vocab && !n_added)
		return ds_errf(e, -EINVAL, "%s: empty vocabulary", path);
	if (str_bytes >= UINT32_MAX / 2)
		return ds_errf(e, -EFBIG, "%s: vocabulary too large", path);
	t->n_ids = max_id + 1;
	t->n_added = (int)n_added;
	t->strs = malloc(str_bytes + 1);
	t->piece_off = malloc(t->n_ids * sizeof(uint32_t));
	t->piece_len = malloc(t->n_ids * sizeof(uint32_t));
	t->special = calloc(t->n_ids, 1);
	if (!t->strs || !t->piece_off || !t->piece_len || !t->special ||
	    strmap_init(&t->vocab, n_vocab) || strmap_init(&t->added, n_added))
		return ds_errf(e, -ENOMEM, "%s: out of memory", path);
	memset(t->piece_len, 0xff, t->n_ids * sizeof(uint32_t));

	/* Strings into the arena and their hashes first; then the inserts, each prefetching the
	 * slot a few entries ahead (the table is far larger than the caches). */
	uint64_t *vh = malloc(((size_t)n_vocab + 1) * sizeof(*vh));
	uint32_t *voff = malloc(((size_t)n_vocab + 1) * sizeof(*voff));
	uint32_t *vid = malloc(((size_t)n_vocab + 1) * sizeof(*vid));
	if (!vh || !voff || !vid) {
		free(vh);
		free(voff);
		free(vid);
		return ds_errf(e, -ENOMEM, "%s: out of memory", path);
	}
	uint32_t off = 0, nv = 0;
	tj_foreach(it, vocab) {
		jid(it, &vid[nv]);
		memcpy(t->strs + off, it->key, it->key_len);
		voff[nv] = off;
		vh[nv++] = ds_tok_hash(it->key, it->key_len);
		off += it->key_len;
	}
	rc = 0;
	const tj_node *vk = vocab->child;
	for (uint32_t i = 0; i < nv && !rc; i++, vk = vk->next) {
		if (i + 16 < nv)
			__builtin_prefetch(&t->vocab.slot[(uint32_t)vh[i + 16] & t->vocab.mask]);
		uint32_t id = vid[i], len = vk->key_len;
		if (t->piece_len[id] != UINT32_MAX)
			rc = ds_errf(e, -EINVAL, "%s: id %u appears twice in the vocab", path, id);
		else if (strmap_put_h(t->strs, &t->vocab, voff[i], len, (int32_t)id, vh[i]) >= 0)
			rc = ds_errf(e, -EINVAL, "%s: token \"%.64s\" appears twice in the vocab",
				     path, vk->key);
		t->piece_off[id] = voff[i];
		t->piece_len[id] = len;
	}
	free(vh);
	free(voff);
	free(vid);
	if (rc)
		return rc;
	if (tj_is(added, TJ_ARR)) {
		if (trie_init(&t->trie_raw) || trie_init(&t->trie_norm))
			return ds_errf(e, -ENOMEM, "%s: out of memory", path);
		tj_foreach(it, added) {
			uint32_t id = 0, len;
			const char *c = jstr(it, "content");
			jid(tj_get(it, "id"), &id);
			len = (uint32_t)strlen(c);
			memcpy(t->strs + off, c, len);
			strmap_put(t->strs, &t->added, off, len, (int32_t)id);
			t->piece_off[id] = off;
			t->piece_len[id] = len;
			t->special[id] = jbool(it, "special") == 1;
			/* HF's default for "normalized" is the opposite of "special". */
			const tj_node *nz = tj_get(it, "normalized");
			int norm = nz ? tj_is(nz, TJ_TRUE) : !t->special[id];
			if (trie_add(norm ? &t->trie_norm : &t->trie_raw, (const uint8_t *)c, len,
				     (int32_t)id))
				return ds_errf(e, -ENOMEM, "%s: out of memory", path);
			off += len;
		}
	}

	/* Byte-level alphabet: each byte's character must be a single-character token. */
	for (int b = 0; b < 256; b++) {
		char s[4];
		int n = utf8_put(s, byte_char(b));
		t->byte_id[b] = ds_tok_map_get(t, &t->vocab, s, (size_t)n);
	}
	t->unk_id = -1;
	const char *unk = jstr(model, "unk_token");
	if (unk && (t->unk_id = ds_tok_map_get(t, &t->vocab, unk, strlen(unk))) < 0)
		return ds_errf(e, -EINVAL, "%s: unk_token %.64s is not in the vocab", path, unk);

	/* Merges: "a b" strings or [a, b] pairs; rank = position. */
	uint32_t n_merges = merges ? merges->len : 0, cap = 16;
	while (cap < 2 * n_merges + 16)
		cap <<= 1;
	t->merge_mask = cap - 1;
	t->merge_key = calloc(cap, sizeof(uint64_t));
	t->merge_val = malloc(cap * sizeof(uint64_t));
	if (!t->merge_key || !t->merge_val)
		return ds_errf(e, -ENOMEM, "%s: out of memory", path);
	/* The three vocab lookups of each merge (a, b, a+b) are independent and dominate loading:
	 * they run batched (strmap_get_many). Spreading them over threads (OpenMP) was measured
	 * slower on the 16-core GPU machine (46 ms vs 40 ms for the whole load), so one thread. */
	const tj_node **mv = malloc(((size_t)n_merges + 1) * sizeof(*mv));
	int32_t *tri = malloc(((size_t)n_merges + 1) * 3 * sizeof(int32_t));
	const char **ms = malloc(((size_t)n_merges + 1) * 3 * sizeof(*ms));
	uint32_t *ml = malloc(((size_t)n_merges + 1) * 3 * sizeof(*ml));
	size_t cat_bytes = 0;
	uint32_t nm = 0;
	tj_foreach(it, merges) {
		if (mv)
			mv[nm] = it;
		nm++;
		cat_bytes += tj_is(it, TJ_STR) ? it->len : 0;
		if (tj_is(it, TJ_ARR) && it->len == 2 && tj_is(it->child, TJ_STR) &&
		    tj_is(it->child->next, TJ_STR))
			cat_bytes += (size_t)it->child->len + it->child->next->len;
	}
	char *cat = malloc(cat_bytes + 1);
	if (!mv || !tri || !ms || !ml || !cat) {
		free(mv);
		free(tri);
		free(ms);
		free(ml);
		free(cat);
		return ds_errf(e, -ENOMEM, "%s: out of memory", path);
	}
	size_t co = 0;
	for (uint32_t r = 0; r < n_merges; r++) {
		const char *ma, *mb;
		size_t la, lb;
		if (merge_parts(mv[r], &ma, &la, &mb, &lb)) {
			for (int j = 0; j < 3; j++) {
				ms[3 * r + j] = ""; /* looked up harmlessly, then reported */
				ml[3 * r + j] = 0;
			}
			tri[3 * r] = -2;
			continue;
		}
		memcpy(cat + co, ma, la);
		memcpy(cat + co + la, mb, lb);
		ms[3 * r] = ma;
		ml[3 * r] = (uint32_t)la;
		ms[3 * r + 1] = mb;
		ml[3 * r + 1] = (uint32_t)lb;
		ms[3 * r + 2] = cat + co;
		ml[3 * r + 2] = (uint32_t)(la + lb);
		co += la + lb;
	}
	strmap_get_many(t, &t->vocab, 3 * (size_t)n_merges, ms, ml, tri);
	for (uint32_t r = 0; r < n_merges; r++) {
		if (ml[3 * r] == 0 && ml[3 * r + 1] == 0)
			tri[3 * r] = -2;
		else if (tri[3 * r] < 0 || tri[3 * r + 1] < 0 || tri[3 * r + 2] < 0)
			tri[3 * r] = -1;
	}
	free(ms);
	free(ml);
	free(cat);
	rc = 0;
	for (uint32_t r = 0; r < n_merges && !rc; r++) {
		const char *ma, *mb;
		size_t la, lb;
		if (tri[3 * r] == -2)
			rc = ds_errf(e, -EINVAL, "%s: merge %u is neither \"a b\" (one space) nor [a, b]",
				     path, r);
		else if (tri[3 * r] < 0 && !merge_parts(mv[r], &ma, &la, &mb, &lb))
			rc = ds_errf(e, -EINVAL, "%s: merge %u (%.40s + %.40s): token not in the vocab",
				     path, r, ma, mb);
		else {
			if (r + 16 < n_merges && tri[3 * (r + 16)] >= 0)
				merge_prefetch(t, tri[3 * (r + 16)], tri[3 * (r + 16) + 1]);
			merge_put(t, tri[3 * r], tri[3 * r + 1], r, tri[3 * r + 2]);
		}
	}
	free(mv);
	free(tri);
	if (rc)
		return rc;

	/* What each id decodes to: HF's ByteLevel decoder maps a token's characters back to bytes
	 * when all of them are byte-level characters, and keeps the token's UTF-8 otherwise. */
	int16_t rev[324];
	for (int i = 0; i < 324; i++)
		rev[i] = -1;
	for (int b = 0; b < 256; b++)
		rev[byte_char(b)] = (int16_t)b;
	/* Decoded bytes are never longer than the token string, so each id's bytes sit at its
	 * string's offset in an arena of the same size. */
	t->bytes = malloc(str_bytes + 1);
	t->bytes_off = t->piece_off; /* shared; freed once */
	t->bytes_len = calloc(t->n_ids, sizeof(uint32_t));
	if (!t->bytes || !t->bytes_len)
		return ds_errf(e, -ENOMEM, "%s: out of memory", path);
	for (uint32_t id = 0; id < t->n_ids; id++) {
		if (t->piece_len[id] == UINT32_MAX)
			continue;
		const uint8_t *p = (const uint8_t *)t->strs + t->piece_off[id];
		uint8_t *o = t->bytes + t->piece_off[id];
		uint32_t n = t->piece_len[id], i = 0, k = 0;
		int all = 1;
		while (i < n) {
			uint32_t cp = UINT32_MAX;
			if (p[i] < 0x80)
				cp = p[i++];
			else if ((p[i] & 0xe0) == 0xc0 && i + 1 < n && (p[i + 1] & 0xc0) == 0x80) {
				cp = (uint32_t)(p[i] & 0x1f) << 6 | (p[i + 1] & 0x3f);
				i += 2;
				if (cp < 0x80)
					cp = UINT32_MAX; /* overlong: not UTF-8 */
			}
			/* byte-level characters are all below U+0144; anything else keeps its bytes */
			if (cp >= 324 || rev[cp] < 0) {
				all = 0;
				break;
			}
			o[k++] = (uint8_t)rev[cp];
		}
		if (!all) {
			memcpy(o, p, n);
			k = n;
		}
		t->bytes_len[id] = k;
	}
	return load_pretok(t, root, path, e);
}

ds_tok *ds_tok_free(ds_tok *t)
{
	if (!t)
		return NULL;
	free(t->strs);
	free(t->piece_off);
	free(t->piece_len);
	free(t->bytes);
	free(t->bytes_len);
	free(t->special);
	strmap_free(&t->vocab);
	strmap_free(&t->added);
	free(t->merge_key);
	free(t->merge_val);
	for (int i = 0; i < t->n_steps; i++)
		pcre2_code_free(t->step[i]);
	trie_free(&t->trie_raw);
	trie_free(&t->trie_norm);
	free(t->chat_template);
	free(t);
	return NULL;
}

/* Parses buf (writable, buf[len] == 0) in place and builds the tokenizer from it. */
static int load_owned(char *buf, size_t len, const char *path, ds_tok **out, ds_err *e)
{
	tj_doc doc;
	size_t off = 0;
	int rc = tj_parse(buf, len, &doc, &off);
	if (rc == -ENOMEM)
		return ds_errf(e, rc, "%s: out of memory", path);
	if (rc)
		return ds_errf(e, rc, "%s: malformed JSON at byte %zu", path, off);
	ds_tok *t = calloc(1, sizeof(*t));
	if (!t) {
		tj_free(&doc);
		return ds_errf(e, -ENOMEM, "%s: out of memory", path);
	}
	t->bos = t->eos = -1;
	rc = load_json(t, doc.n, path, e);
	tj_free(&doc);
	if (rc) {
		ds_tok_free(t);
		return rc;
	}
	*out = t;
	return 0;
}

int ds_tok_load(const char *path, ds_tok **out, ds_err *e)
{
	char *buf;
	size_t len;
	int rc = read_file(path, &buf, &len, e);
	if (rc)
		return rc;
	rc = load_owned(buf, len, path, out, e);
	free(buf);
	return rc;
}

int ds_tok_load_buffer(const char *json, size_t len, const char *name, ds_tok **out, ds_err *e)
{
	if (!json || !out || len > TOK_MAX_FILE)
		return ds_errf(e, -EINVAL, "%s: no buffer, or larger than %u bytes", name, TOK_MAX_FILE);
	char *buf = malloc(len + 1);
	if (!buf)
		return ds_errf(e, -ENOMEM, "%s: out of memory", name);
	memcpy(buf, json, len);
	buf[len] = 0;
	int rc = load_owned(buf, len, name, out, e);
	free(buf);
	return rc;
}

/* bos_token/eos_token: a string or {"content": ...}; null/absent leaves -1. */
static int config_token(const ds_tok *t, const tj_node *cfg, const char *key, int32_t *id,
			const char *path, ds_err *e)
{
	const tj_node *v = tj_get(cfg, key);
	if (!v || tj_is(v, TJ_NULL))
		return 0;
	const char *s = tj_is(v, TJ_STR) ? v->s : jstr(v, "content");
	if (!s)
		return ds_errf(e, -EINVAL, "%s: %s is neither a string nor {\"content\": ...}", path,
			       key);
	if ((*id = ds_tok_piece_to_id(t, s, strlen(s))) < 0)
		return ds_errf(e, -EINVAL, "%s: %s \"%.64s\" is not a token", path, key, s);
	return 0;
}

int ds_tok_load_dir(const char *dir, ds_tok **out, ds_err *e)
{
	char path[4096];
	if ((size_t)snprintf(path, sizeof(path), "%s/tokenizer.json", dir) >= sizeof(path))
		return ds_errf(e, -ENAMETOOLONG, "%s: path too long", dir);
	ds_tok *t;
	int rc = ds_tok_load(path, &t, e);
	if (rc)
		return rc;
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
	char *buf;
	size_t len, off = 0;
	struct stat st;
	if (stat(path, &st) && errno == ENOENT) {
		*out = t;
		return 0;
	}
	if ((rc = read_file(path, &buf, &len, e))) {
		ds_tok_free(t);
		return rc;
	}
	tj_doc doc;
	rc = tj_parse(buf, len, &doc, &off);
	if (rc || !tj_is(doc.n, TJ_OBJ)) {
		if (!rc)
			tj_free(&doc);
		free(buf);
		ds_tok_free(t);
		return ds_errf(e, rc == -ENOMEM ? rc : -EINVAL, "%s: malformed JSON%s", path,
			       rc ? "" : " (not an object)");
	}
	const tj_node *cfg = doc.n;
	rc = config_token(t, cfg, "bos_token", &t->bos, path, e);
	if (!rc)
		rc = config_token(t, cfg, "eos_token", &t->eos, path, e);
	t->add_bos = jbool(cfg, "add_bos_token") == 1;
	const char *tmpl = jstr(cfg, "chat_template");
	if (!rc && tmpl && !(t->chat_template = strdup(tmpl)))
		rc = ds_errf(e, -ENOMEM, "%s: out of memory", path);
	tj_free(&doc);
	free(buf);
	if (rc) {
		ds_tok_free(t);
		return rc;
	}
	*out = t;
	return 0;
}

size_t ds_tok_vocab_size(const ds_tok *t)
{
	return t->n_ids;
}

int32_t ds_tok_bos(const ds_tok *t)
{
	return t->bos;
}

int32_t ds_tok_eos(const ds_tok *t)
{
	return t->eos;
}

int ds_tok_add_bos(const ds_tok *t)
{
	return t->add_bos;
}

const char *ds_tok_chat_template(const ds_tok *t)
{
	return t->chat_template;
}

const char *ds_tok_id_to_piece(const ds_tok *t, int32_t id, size_t *len)
{
	if (id < 0 || (uint32_t)id >= t->n_ids || t->piece_len[id] == UINT32_MAX)
		return NULL;
	*len = t->piece_len[id];
	return t->strs + t->piece_off[id];
}

int32_t ds_tok_piece_to_id(const ds_tok *t, const char *piece, size_t len)
{
	int32_t id = ds_tok_map_get(t, &t->added, piece, len);
	return id >= 0 ? id : ds_tok_map_get(t, &t->vocab, piece, len);
}

int ds_tok_is_special(const ds_tok *t, int32_t id)
{
	return id >= 0 && (uint32_t)id < t->n_ids && t->special[id];
}

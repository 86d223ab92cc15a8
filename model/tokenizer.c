/* tokenizer.c — loading tokenizer.json (+ tokenizer_config.json) into an immutable ds_tok.
 * Supports what byte-level BPE tokenizers such as DeepSeek-V3's use; anything else is refused
 * with -ENOTSUP and a message naming it, rather than tokenized differently from HF. */
#include "model/tok_internal.h"

#include <cjson/cJSON.h>
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
	memcpy(&w, s, n);
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
	m->e_off = malloc((n + 1) * sizeof(*m->e_off));
	m->e_len = malloc((n + 1) * sizeof(*m->e_len));
	m->e_id = malloc((n + 1) * sizeof(*m->e_id));
	m->mask = cap - 1;
	m->n = 0;
	return m->slot && m->e_off && m->e_len && m->e_id ? 0 : -ENOMEM;
}

static void strmap_free(tok_strmap *m)
{
	free(m->slot);
	free(m->e_off);
	free(m->e_len);
	free(m->e_id);
}

/* Inserts strs[off..off+len) -> id; returns the id already there for a duplicate. */
static int32_t strmap_put(const char *strs, tok_strmap *m, uint32_t off, uint32_t len, int32_t id)
{
	uint32_t i = (uint32_t)ds_tok_hash(strs + off, len) & m->mask;
	for (;; i = (i + 1) & m->mask) {
		uint32_t s = m->slot[i];
		if (!s)
			break;
		s--;
		if (m->e_len[s] == len && !memcmp(strs + m->e_off[s], strs + off, len))
			return m->e_id[s];
	}
	m->e_off[m->n] = off;
	m->e_len[m->n] = len;
	m->e_id[m->n] = id;
	m->slot[i] = ++m->n;
	return -1;
}

int32_t ds_tok_map_get(const ds_tok *t, const tok_strmap *m, const char *s, size_t n)
{
	if (!m->slot)
		return -1;
	uint32_t i = (uint32_t)ds_tok_hash(s, n) & m->mask;
	for (;; i = (i + 1) & m->mask) {
		uint32_t e = m->slot[i];
		if (!e)
			return -1;
		e--;
		if (m->e_len[e] == n && !memcmp(t->strs + m->e_off[e], s, n))
			return m->e_id[e];
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

/* Decodes one code point of valid UTF-8 at s; returns its length. */
static int utf8_get(const uint8_t *s, uint32_t *cp)
{
	if (s[0] < 0x80) {
		*cp = s[0];
		return 1;
	}
	if (s[0] < 0xe0) {
		*cp = (uint32_t)(s[0] & 0x1f) << 6 | (s[1] & 0x3f);
		return 2;
	}
	if (s[0] < 0xf0) {
		*cp = (uint32_t)(s[0] & 0x0f) << 12 | (uint32_t)(s[1] & 0x3f) << 6 | (s[2] & 0x3f);
		return 3;
	}
	*cp = (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3f) << 12 |
	      (uint32_t)(s[2] & 0x3f) << 6 | (s[3] & 0x3f);
	return 4;
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

static const char *jstr(const cJSON *o, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* 1 when the member is true, 0 when false/null/absent, -1 when present with another type. */
static int jbool(const cJSON *o, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	if (!v || cJSON_IsNull(v) || cJSON_IsFalse(v))
		return 0;
	return cJSON_IsTrue(v) ? 1 : -1;
}

static int jid(const cJSON *v, uint32_t *id)
{
	if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= TOK_MAX_ID ||
	    v->valuedouble != (double)(uint32_t)v->valuedouble)
		return -1;
	*id = (uint32_t)v->valuedouble;
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

static int load_pretok_one(ds_tok *t, const cJSON *p, const char *path, ds_err *e)
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
		const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
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
		const cJSON *ur = cJSON_GetObjectItemCaseSensitive(p, "use_regex");
		if (!ur || cJSON_IsTrue(ur)) /* HF's default is true */
			return compile_step(t, GPT2_SPLIT, sizeof(GPT2_SPLIT) - 1, 0, path, e);
		return 0;
	}
	return ds_errf(e, -ENOTSUP, "%s: pre-tokenizer type %s is not supported", path, type);
}

static int load_pretok(ds_tok *t, const cJSON *root, const char *path, ds_err *e)
{
	const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
	if (!p || cJSON_IsNull(p))
		return 0;
	if (!cJSON_IsObject(p))
		return ds_errf(e, -EINVAL, "%s: pre_tokenizer is not an object", path);
	const char *type = jstr(p, "type");
	if (type && !strcmp(type, "Sequence")) {
		const cJSON *l = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers"), *s;
		if (!cJSON_IsArray(l))
			return ds_errf(e, -EINVAL, "%s: Sequence pre_tokenizer without pretokenizers",
				       path);
		cJSON_ArrayForEach(s, l) {
			if (!cJSON_IsObject(s))
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
static int check_other_parts(const cJSON *root, const char *path, ds_err *e)
{
	const cJSON *n = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
	if (n && !cJSON_IsNull(n)) {
		const char *type = jstr(n, "type");
		const cJSON *l = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
		if (!type || strcmp(type, "Sequence") || !cJSON_IsArray(l) || cJSON_GetArraySize(l))
			return ds_errf(e, -ENOTSUP, "%s: normalizer %s is not supported (only none or "
				       "an empty Sequence)", path, type ? type : "(untyped)");
	}
	const cJSON *d = cJSON_GetObjectItemCaseSensitive(root, "decoder");
	const char *dt = jstr(d, "type");
	if (!dt || strcmp(dt, "ByteLevel"))
		return ds_errf(e, -ENOTSUP, "%s: decoder %s is not supported (only ByteLevel)", path,
			       dt ? dt : "(none)");
	return 0;
}

static int load_model_opts(ds_tok *t, const cJSON *model, const char *path, ds_err *e)
{
	const char *type = jstr(model, "type");
	if (type && strcmp(type, "BPE"))
		return ds_errf(e, -ENOTSUP, "%s: model type %s is not supported (only BPE)", path,
			       type);
	const cJSON *d = cJSON_GetObjectItemCaseSensitive(model, "dropout");
	if (d && !cJSON_IsNull(d) && !(cJSON_IsNumber(d) && d->valuedouble == 0))
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

static int load_json(ds_tok *t, cJSON *root, const char *path, ds_err *e)
{
	if (!cJSON_IsObject(root))
		return ds_errf(e, -EINVAL, "%s: not a JSON object", path);
	const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
	if (!cJSON_IsObject(model))
		return ds_errf(e, -EINVAL, "%s: no \"model\" object", path);
	int rc = load_model_opts(t, model, path, e);
	if (rc)
		return rc;
	const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
	const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
	const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
	if (!cJSON_IsObject(vocab))
		return ds_errf(e, -EINVAL, "%s: model.vocab is not an object", path);
	if (merges && !cJSON_IsArray(merges))
		return ds_errf(e, -EINVAL, "%s: model.merges is not an array", path);
	if (added && !cJSON_IsNull(added) && !cJSON_IsArray(added))
		return ds_errf(e, -EINVAL, "%s: added_tokens is not an array", path);
	if ((rc = check_other_parts(root, path, e)))
		return rc;

	/* Sizes first: ids, string bytes. */
	uint32_t n_vocab = 0, max_id = 0, n_added = 0;
	size_t str_bytes = 0;
	const cJSON *it;
	cJSON_ArrayForEach(it, vocab) {
		uint32_t id;
		if (jid(it, &id))
			return ds_errf(e, -EINVAL, "%s: vocab entry \"%.64s\" has no valid id", path,
				       it->string);
		max_id = id > max_id ? id : max_id;
		str_bytes += strlen(it->string);
		n_vocab++;
	}
	if (cJSON_IsArray(added))
		cJSON_ArrayForEach(it, added) {
			uint32_t id;
			const char *c = jstr(it, "content");
			if (!cJSON_IsObject(it) || !c || !*c ||
			    jid(cJSON_GetObjectItemCaseSensitive(it, "id"), &id))
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

	uint32_t off = 0;
	cJSON_ArrayForEach(it, vocab) {
		uint32_t id = 0, len = (uint32_t)strlen(it->string);
		jid(it, &id);
		memcpy(t->strs + off, it->string, len);
		if (t->piece_len[id] != UINT32_MAX)
			return ds_errf(e, -EINVAL, "%s: id %u appears twice in the vocab", path, id);
		if (strmap_put(t->strs, &t->vocab, off, len, (int32_t)id) >= 0)
			return ds_errf(e, -EINVAL, "%s: token \"%.64s\" appears twice in the vocab",
				       path, it->string);
		t->piece_off[id] = off;
		t->piece_len[id] = len;
		off += len;
	}
	if (cJSON_IsArray(added)) {
		if (trie_init(&t->trie_raw) || trie_init(&t->trie_norm))
			return ds_errf(e, -ENOMEM, "%s: out of memory", path);
		cJSON_ArrayForEach(it, added) {
			uint32_t id = 0, len;
			const char *c = jstr(it, "content");
			jid(cJSON_GetObjectItemCaseSensitive(it, "id"), &id);
			len = (uint32_t)strlen(c);
			memcpy(t->strs + off, c, len);
			strmap_put(t->strs, &t->added, off, len, (int32_t)id);
			t->piece_off[id] = off;
			t->piece_len[id] = len;
			t->special[id] = jbool(it, "special") == 1;
			/* HF's default for "normalized" is the opposite of "special". */
			const cJSON *nz = cJSON_GetObjectItemCaseSensitive(it, "normalized");
			int norm = nz ? cJSON_IsTrue(nz) : !t->special[id];
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
	uint32_t n_merges = merges ? (uint32_t)cJSON_GetArraySize(merges) : 0, cap = 16;
	while (cap < 2 * n_merges + 16)
		cap <<= 1;
	t->merge_mask = cap - 1;
	t->merge_key = calloc(cap, sizeof(uint64_t));
	t->merge_val = malloc(cap * sizeof(uint64_t));
	if (!t->merge_key || !t->merge_val)
		return ds_errf(e, -ENOMEM, "%s: out of memory", path);
	uint32_t rank = 0;
	size_t tmp_cap = 256;
	char *tmp = malloc(tmp_cap);
	if (!tmp)
		return ds_errf(e, -ENOMEM, "%s: out of memory", path);
	rc = 0;
	if (merges)
		cJSON_ArrayForEach(it, merges) {
			const char *a, *b;
			size_t la, lb;
			if (cJSON_IsString(it)) {
				a = it->valuestring;
				const char *sp = strchr(a, ' ');
				if (!sp || strchr(sp + 1, ' ')) {
					rc = ds_errf(e, -EINVAL, "%s: merge %u \"%.64s\" is not two "
						     "tokens separated by one space", path, rank, a);
					break;
				}
				la = (size_t)(sp - a);
				b = sp + 1;
				lb = strlen(b);
			} else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 &&
				   cJSON_IsString(it->child) && cJSON_IsString(it->child->next)) {
				a = it->child->valuestring;
				b = it->child->next->valuestring;
				la = strlen(a);
				lb = strlen(b);
			} else {
				rc = ds_errf(e, -EINVAL, "%s: merge %u is neither \"a b\" nor [a, b]",
					     path, rank);
				break;
			}
			if (la + lb > tmp_cap) {
				tmp_cap = 2 * (la + lb);
				char *nt = realloc(tmp, tmp_cap);
				if (!nt) {
					rc = ds_errf(e, -ENOMEM, "%s: out of memory", path);
					break;
				}
				tmp = nt;
			}
			memcpy(tmp, a, la);
			memcpy(tmp + la, b, lb);
			int32_t ia = ds_tok_map_get(t, &t->vocab, a, la);
			int32_t ib = ds_tok_map_get(t, &t->vocab, b, lb);
			int32_t im = ds_tok_map_get(t, &t->vocab, tmp, la + lb);
			if (ia < 0 || ib < 0 || im < 0) {
				rc = ds_errf(e, -EINVAL, "%s: merge %u (%.40s + %.40s): token not in "
					     "the vocab", path, rank, a, b);
				break;
			}
			merge_put(t, ia, ib, rank++, im);
		}
	free(tmp);
	if (rc)
		return rc;

	/* What each id decodes to: HF's ByteLevel decoder maps a token's characters back to bytes
	 * when all of them are byte-level characters, and keeps the token's UTF-8 otherwise. */
	int16_t rev[324];
	for (int i = 0; i < 324; i++)
		rev[i] = -1;
	for (int b = 0; b < 256; b++)
		rev[byte_char(b)] = (int16_t)b;
	t->bytes = malloc(str_bytes + 1);
	t->bytes_off = malloc(t->n_ids * sizeof(uint32_t));
	t->bytes_len = calloc(t->n_ids, sizeof(uint32_t));
	if (!t->bytes || !t->bytes_off || !t->bytes_len)
		return ds_errf(e, -ENOMEM, "%s: out of memory", path);
	uint32_t bo = 0;
	for (uint32_t id = 0; id < t->n_ids; id++) {
		t->bytes_off[id] = bo;
		if (t->piece_len[id] == UINT32_MAX)
			continue;
		const uint8_t *p = (const uint8_t *)t->strs + t->piece_off[id];
		uint32_t n = t->piece_len[id], i = 0, k = 0;
		int all = ds_tok_utf8_valid_prefix(p, n) == n;
		while (all && i < n) {
			uint32_t cp;
			i += (uint32_t)utf8_get(p + i, &cp);
			if (cp >= 324 || rev[cp] < 0)
				all = 0;
			else
				t->bytes[bo + k++] = (uint8_t)rev[cp];
		}
		if (!all) {
			memcpy(t->bytes + bo, p, n);
			k = n;
		}
		t->bytes_len[id] = k;
		bo += k;
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
	free(t->bytes_off);
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

int ds_tok_load(const char *path, ds_tok **out, ds_err *e)
{
	char *buf;
	size_t len;
	int rc = read_file(path, &buf, &len, e);
	if (rc)
		return rc;
	rc = ds_tok_load_buffer(buf, len, path, out, e);
	free(buf);
	return rc;
}

int ds_tok_load_buffer(const char *buf, size_t len, const char *path, ds_tok **out, ds_err *e)
{
	int rc;
	cJSON *root = cJSON_ParseWithLength(buf, len);
	if (!root)
		return ds_errf(e, -EINVAL, "%s: malformed JSON", path);
	ds_tok *t = calloc(1, sizeof(*t));
	if (!t) {
		cJSON_Delete(root);
		return ds_errf(e, -ENOMEM, "%s: out of memory", path);
	}
	t->bos = t->eos = -1;
	rc = load_json(t, root, path, e);
	cJSON_Delete(root);
	if (rc) {
		ds_tok_free(t);
		return rc;
	}
	*out = t;
	return 0;
}

/* bos_token/eos_token: a string or {"content": ...}; null/absent leaves -1. */
static int config_token(const ds_tok *t, const cJSON *cfg, const char *key, int32_t *id,
			const char *path, ds_err *e)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
	if (!v || cJSON_IsNull(v))
		return 0;
	const char *s = cJSON_IsString(v) ? v->valuestring : jstr(v, "content");
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
	size_t len;
	struct stat st;
	if (stat(path, &st) && errno == ENOENT) {
		*out = t;
		return 0;
	}
	if ((rc = read_file(path, &buf, &len, e))) {
		ds_tok_free(t);
		return rc;
	}
	cJSON *cfg = cJSON_ParseWithLength(buf, len);
	free(buf);
	if (!cJSON_IsObject(cfg)) {
		cJSON_Delete(cfg);
		ds_tok_free(t);
		return ds_errf(e, -EINVAL, "%s: malformed JSON", path);
	}
	rc = config_token(t, cfg, "bos_token", &t->bos, path, e);
	if (!rc)
		rc = config_token(t, cfg, "eos_token", &t->eos, path, e);
	t->add_bos = jbool(cfg, "add_bos_token") == 1;
	const char *tmpl = jstr(cfg, "chat_template");
	if (!rc && tmpl && !(t->chat_template = strdup(tmpl)))
		rc = ds_errf(e, -ENOMEM, "%s: out of memory", path);
	cJSON_Delete(cfg);
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

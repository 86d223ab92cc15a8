/* tok_encode.c — text -> ids, as HF tokenizers' Tokenizer.encode(add_special_tokens=False):
 * added tokens are cut out first (leftmost-longest; non-normalized ones, then normalized ones
 * in the gaps), each gap runs through the pre-tokenizer's regex splits in order, and each
 * resulting word through byte-level BPE (lowest merge rank first, leftmost on ties).
 * All state is per call: any number of threads may encode with one ds_tok. */
#include "model/tok_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Words of at most this many symbols merge by scanning an array; longer ones use a heap. */
#define BPE_SCAN_MAX 64
#define NO_RANK UINT32_MAX

typedef struct enc {
	const ds_tok *t;
	int32_t *ids;
	size_t n, cap;
	pcre2_match_data *md;
	pcre2_match_context *mctx;
	pcre2_jit_stack *jit;
	/* BPE scratch, grown on demand */
	int32_t *sym, *mid, *nxt, *prv;
	uint32_t *rk;
	uint64_t *heap;
	size_t scap;
	char *bl;	/* byte-level spelling of a word, for ignore_merges */
	ds_err *e;
} enc;

static int push(enc *E, int32_t id)
{
	if (E->n == E->cap) {
		size_t nc = E->cap ? 2 * E->cap : 256;
		int32_t *ni = realloc(E->ids, nc * sizeof(*ni));
		if (!ni)
			return ds_errf(E->e, -ENOMEM, "encode: out of memory");
		E->ids = ni;
		E->cap = nc;
	}
	E->ids[E->n++] = id;
	return 0;
}

static inline uint32_t merge_get(const ds_tok *t, int32_t a, int32_t b, int32_t *m)
{
	uint64_t k = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
	uint32_t i = (uint32_t)((k * 0x9e3779b97f4a7c15ull) >> 32) & t->merge_mask;
	for (;; i = (i + 1) & t->merge_mask) {
		uint64_t kk = t->merge_key[i];
		if (kk == k) {
			*m = (int32_t)(uint32_t)t->merge_val[i];
			return (uint32_t)(t->merge_val[i] >> 32);
		}
		if (!kk)
			return NO_RANK;
	}
}

static int scratch(enc *E, size_t n)
{
	if (n <= E->scap)
		return 0;
	size_t c = n + n / 2 + 64;
	int32_t *a = realloc(E->sym, c * sizeof(int32_t));
	if (a)
		E->sym = a;
	int32_t *b = realloc(E->mid, c * sizeof(int32_t));
	if (b)
		E->mid = b;
	int32_t *d = realloc(E->nxt, c * sizeof(int32_t));
	if (d)
		E->nxt = d;
	int32_t *f = realloc(E->prv, c * sizeof(int32_t));
	if (f)
		E->prv = f;
	uint32_t *g = realloc(E->rk, c * sizeof(uint32_t));
	if (g)
		E->rk = g;
	uint64_t *h = realloc(E->heap, 3 * c * sizeof(uint64_t));
	if (h)
		E->heap = h;
	char *bl = realloc(E->bl, 2 * c);
	if (bl)
		E->bl = bl;
	if (!a || !b || !d || !f || !g || !h || !bl)
		return ds_errf(E->e, -ENOMEM, "encode: out of memory");
	E->scap = c;
	return 0;
}

/* Few symbols: keep them in an array with each adjacent pair's rank cached, merge the lowest. */
static size_t bpe_scan(const ds_tok *t, int32_t *sym, int32_t *mid, uint32_t *rk, size_t m)
{
	for (size_t i = 0; i + 1 < m; i++)
		rk[i] = merge_get(t, sym[i], sym[i + 1], &mid[i]);
	rk[m - 1] = NO_RANK;
	while (m > 1) {
		size_t best = 0;
		uint32_t br = rk[0];
		for (size_t i = 1; i + 1 < m; i++)
			if (rk[i] < br) {
				br = rk[i];
				best = i;
			}
		if (br == NO_RANK)
			break;
		sym[best] = mid[best];
		memmove(sym + best + 1, sym + best + 2, (m - best - 2) * sizeof(*sym));
		memmove(mid + best + 1, mid + best + 2, (m - best - 2) * sizeof(*mid));
		memmove(rk + best + 1, rk + best + 2, (m - best - 2) * sizeof(*rk));
		m--;
		if (best + 1 < m)
			rk[best] = merge_get(t, sym[best], sym[best + 1], &mid[best]);
		else
			rk[best] = NO_RANK;
		if (best > 0)
			rk[best - 1] = merge_get(t, sym[best - 1], sym[best], &mid[best - 1]);
	}
	return m;
}

static void heap_push(uint64_t *h, size_t *n, uint64_t v)
{
	size_t i = (*n)++;
	while (i > 0) {
		size_t p = (i - 1) / 2;
		if (h[p] <= v)
			break;
		h[i] = h[p];
		i = p;
	}
	h[i] = v;
}

static uint64_t heap_pop(uint64_t *h, size_t *n)
{
	uint64_t top = h[0], v = h[--*n];
	size_t i = 0, m = *n;
	for (;;) {
		size_t c = 2 * i + 1;
		if (c >= m)
			break;
		if (c + 1 < m && h[c + 1] < h[c])
			c++;
		if (h[c] >= v)
			break;
		h[i] = h[c];
		i = c;
	}
	if (m)
		h[i] = v;
	return top;
}

/* Many symbols: a linked list and a heap of (rank, position); entries whose pair has changed
 * since they were pushed are recognized by the rank no longer matching and dropped. */
static size_t bpe_heap(enc *E, size_t m)
{
	const ds_tok *t = E->t;
	int32_t *sym = E->sym, *mid = E->mid, *nxt = E->nxt, *prv = E->prv;
	uint32_t *rk = E->rk;
	uint64_t *h = E->heap;
	size_t hn = 0;
	for (size_t i = 0; i < m; i++) {
		nxt[i] = i + 1 < m ? (int32_t)i + 1 : -1;
		prv[i] = (int32_t)i - 1;
		rk[i] = i + 1 < m ? merge_get(t, sym[i], sym[i + 1], &mid[i]) : NO_RANK;
		if (rk[i] != NO_RANK)
			heap_push(h, &hn, (uint64_t)rk[i] << 32 | i);
	}
	while (hn) {
		uint64_t top = heap_pop(h, &hn);
		uint32_t r = (uint32_t)(top >> 32), p = (uint32_t)top;
		if (sym[p] < 0 || rk[p] != r)
			continue;
		int32_t q = nxt[p];
		sym[p] = mid[p];
		sym[q] = -1;
		nxt[p] = nxt[q];
		if (nxt[q] >= 0)
			prv[nxt[q]] = (int32_t)p;
		rk[p] = nxt[p] >= 0 ? merge_get(t, sym[p], sym[nxt[p]], &mid[p]) : NO_RANK;
		if (rk[p] != NO_RANK)
			heap_push(h, &hn, (uint64_t)rk[p] << 32 | p);
		int32_t a = prv[p];
		if (a >= 0) {
			rk[a] = merge_get(t, sym[a], sym[p], &mid[a]);
			if (rk[a] != NO_RANK)
				heap_push(h, &hn, (uint64_t)rk[a] << 32 | (uint32_t)a);
		}
	}
	size_t k = 0;
	for (int32_t i = 0; i >= 0; i = nxt[i])
		sym[k++] = sym[i];
	return k;
}

/* Byte-level spelling of bytes b (each byte -> one character of GPT-2's alphabet). */
static size_t byte_level(const ds_tok *t, const uint8_t *s, size_t n, char *o)
{
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		size_t l;
		const char *p = ds_tok_id_to_piece(t, t->byte_id[s[i]], &l);
		memcpy(o + k, p, l);
		k += l;
	}
	return k;
}

static int bpe(enc *E, const uint8_t *s, size_t n)
{
	const ds_tok *t = E->t;
	if (n == 1 && t->byte_id[s[0]] >= 0)
		return push(E, t->byte_id[s[0]]);
	int rc = scratch(E, n);
	if (rc)
		return rc;
	size_t m = 0;
	int all = 1;
	for (size_t i = 0; i < n; i++) {
		int32_t id = t->byte_id[s[i]];
		if (id < 0) {
			all = 0;
			id = t->unk_id; /* HF drops the character when there is no unk token */
		}
		if (id >= 0)
			E->sym[m++] = id;
	}
	if (t->ignore_merges && all) {
		int32_t id = ds_tok_map_get(t, &t->vocab, E->bl, byte_level(t, s, n, E->bl));
		if (id >= 0)
			return push(E, id);
	}
	if (!m)
		return 0;
	m = m <= BPE_SCAN_MAX ? bpe_scan(t, E->sym, E->mid, E->rk, m) : bpe_heap(E, m);
	for (size_t i = 0; i < m; i++)
		if ((rc = push(E, E->sym[i])))
			return rc;
	return 0;
}

static int regex_next(enc *E, pcre2_code *c, const uint8_t *s, size_t n, size_t from,
		      size_t *ms, size_t *me)
{
	for (;;) {
		int rc = pcre2_match(c, s, n, from, PCRE2_NO_UTF_CHECK, E->md, E->mctx);
		if (rc >= 0) {
			PCRE2_SIZE *ov = pcre2_get_ovector_pointer(E->md);
			*ms = ov[0];
			*me = ov[1];
			return 1;
		}
		if (rc == PCRE2_ERROR_NOMATCH)
			return 0;
		if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !E->jit) {
			E->jit = pcre2_jit_stack_create(64 << 10, 64 << 20, NULL);
			if (!E->mctx)
				E->mctx = pcre2_match_context_create(NULL);
			if (!E->jit || !E->mctx)
				return ds_errf(E->e, -ENOMEM, "encode: out of memory");
			pcre2_jit_stack_assign(E->mctx, NULL, E->jit);
			continue;
		}
		char msg[128];
		pcre2_get_error_message(rc, (PCRE2_UCHAR *)msg, sizeof(msg));
		return ds_errf(E->e, -EOVERFLOW, "encode: pre-tokenizer regex failed: %s", msg);
	}
}

/* Pre-tokenizer step `step` over one piece: matches and the gaps between them each go on to the
 * next step (HF's Split, behavior Isolated); after the last step, BPE. */
static int split(enc *E, int step, const uint8_t *s, size_t n)
{
	if (step == E->t->n_steps)
		return bpe(E, s, n);
	size_t prev = 0, pos = 0, ms = 0, me = 0;
	int rc;
	while (pos <= n && (rc = regex_next(E, E->t->step[step], s, n, pos, &ms, &me)) == 1) {
		if (ms > prev && (rc = split(E, step + 1, s + prev, ms - prev)))
			return rc;
		if (me > ms) {
			if ((rc = split(E, step + 1, s + ms, me - ms)))
				return rc;
			pos = prev = me;
		} else { /* an empty match splits nothing; search again one character on */
			prev = me;
			if (me >= n)
				break;
			pos = me + 1;
			while (pos < n && (s[pos] & 0xc0) == 0x80)
				pos++;
		}
	}
	if (rc < 0)
		return rc;
	if (n > prev)
		return split(E, step + 1, s + prev, n - prev);
	return 0;
}

/* Leftmost-longest match of an added token in s[from..n). */
static int find_added(const tok_trie *tr, const uint8_t *s, size_t n, size_t from, size_t *at,
		      size_t *len, int32_t *id)
{
	if (!tr->key || tr->n_nodes < 2)
		return 0;
	for (size_t i = from; i < n; i++) {
		if (!tr->first[s[i]])
			continue;
		uint32_t node = 0;
		int32_t best = -1;
		size_t bl = 0;
		for (size_t j = i; j < n; j++) {
			uint64_t k = ((uint64_t)node << 8 | s[j]) + 1;
			uint32_t x = (uint32_t)((k * 0x9e3779b97f4a7c15ull) >> 40) & tr->mask;
			while (tr->key[x] && tr->key[x] != k)
				x = (x + 1) & tr->mask;
			if (!tr->key[x])
				break;
			node = tr->child[x];
			if (tr->term[node] >= 0) {
				best = tr->term[node];
				bl = j + 1 - i;
			}
		}
		if (best >= 0) {
			*at = i;
			*len = bl;
			*id = best;
			return 1;
		}
	}
	return 0;
}

/* Phase 0 cuts non-normalized added tokens, phase 1 normalized ones in what is left. */
static int cut_added(enc *E, int phase, const uint8_t *s, size_t n, int no_special)
{
	if (no_special || phase == 2)
		return n ? split(E, 0, s, n) : 0;
	const tok_trie *tr = phase == 0 ? &E->t->trie_raw : &E->t->trie_norm;
	size_t pos = 0, at, len;
	int32_t id;
	int rc;
	while (find_added(tr, s, n, pos, &at, &len, &id)) {
		if (at > pos && (rc = cut_added(E, phase + 1, s + pos, at - pos, 0)))
			return rc;
		if ((rc = push(E, id)))
			return rc;
		pos = at + len;
	}
	return pos < n ? cut_added(E, phase + 1, s + pos, n - pos, 0) : 0;
}

int ds_tok_encode(const ds_tok *t, const char *text, size_t len, unsigned flags, int32_t **ids,
		  size_t *n, ds_err *e)
{
	if (!t || !ids || !n || (!text && len))
		return ds_errf(e, -EINVAL, "encode: NULL argument");
	size_t ok = ds_tok_utf8_valid_prefix((const uint8_t *)text, len);
	if (ok != len)
		return ds_errf(e, -EILSEQ, "encode: invalid UTF-8 at byte %zu", ok);
	enc E = { .t = t, .e = e };
	E.md = pcre2_match_data_create(1, NULL);
	int rc = E.md ? 0 : ds_errf(e, -ENOMEM, "encode: out of memory");
	if (!rc)
		rc = cut_added(&E, 0, (const uint8_t *)text, len, !!(flags & DS_TOK_NO_SPECIAL));
	if (!rc && !E.ids)
		rc = push(&E, 0) ? -ENOMEM : (E.n = 0, 0);
	pcre2_match_data_free(E.md);
	pcre2_match_context_free(E.mctx);
	pcre2_jit_stack_free(E.jit);
	free(E.sym);
	free(E.mid);
	free(E.nxt);
	free(E.prv);
	free(E.rk);
	free(E.heap);
	free(E.bl);
	if (rc) {
		free(E.ids);
		return rc;
	}
	*ids = E.ids;
	*n = E.n;
	return 0;
}

/* Prefix cache over the KV pool, without the engine: a fake sequence does
 * what ds_seq does with blocks (one allocation per block-sized run of
 * positions, adopt = one reference per cached block, free = unref in table
 * order), and a fake "KV" per slot (a hash of every token up to it) checks
 * that a hit never serves blocks computed for other tokens. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cache/kv_pool.h"
#include "cache/prefix.h"

#define MAXB 512
#define MAXT 4096

typedef struct {
	ds_kv_pool *pool;
	ds_prefix *pc;
	int bt;
	uint64_t *kv; /* [blocks][bt]: fake KV, the running hash of the tokens */
} world;

typedef struct {
	int32_t tok[MAXT];
	int n;          /* tokens known */
	int len;        /* positions "computed" */
	int32_t blocks[MAXB];
	int nb;
	int hit;        /* tokens adopted from the cache */
} fseq;

static uint64_t mix(uint64_t h, int32_t t)
{
	h ^= (uint32_t)t + 0x9e3779b97f4a7c15ull;
	h *= 0xbf58476d1ce4e5b9ull;
	return h ^ (h >> 31);
}

static uint64_t kv_at(const fseq *s, int pos)
{
	uint64_t h = 1;
	for (int i = 0; i <= pos; i++)
		h = mix(h, s->tok[i]);
	return h;
}

static void w_open(world *w, int n_blocks, int bt, int with_cache)
{
	memset(w, 0, sizeof(*w));
	w->bt = bt;
	assert_int_equal(ds_kv_pool_new(n_blocks, bt, &w->pool), 0);
	if (with_cache)
		assert_int_equal(ds_prefix_new(w->pool, &w->pc), 0);
	w->kv = calloc((size_t)n_blocks * (size_t)bt, sizeof(uint64_t));
	assert_non_null(w->kv);
}

static void w_close(world *w)
{
	w->pc = ds_prefix_free(w->pc);
	assert_int_equal(ds_kv_pool_free_count(w->pool), ds_kv_pool_blocks(w->pool));
	ds_kv_pool_free(w->pool);
	free(w->kv);
}

static void check(const world *w)
{
	if (w->pc)
		assert_int_equal(ds_prefix_check(w->pc), 0);
}

/* Like ds_seq_adopt_blocks after a lookup; verifies the fake KV. */
static int s_start(world *w, fseq *s)
{
	s->len = s->nb = s->hit = 0;
	if (!w->pc)
		return 0;
	int32_t blk[MAXB];
	int hit = ds_prefix_lookup(w->pc, s->tok, s->n, blk, MAXB);
	assert_true(hit >= 0 && hit % w->bt == 0 && hit < s->n);
	for (int i = 0; i < hit / w->bt; i++) {
		for (int j = 0; j < w->bt; j++)
			assert_true(w->kv[(size_t)blk[i] * w->bt + j] == kv_at(s, i * w->bt + j));
		ds_kv_pool_ref(w->pool, blk[i]);
		s->blocks[s->nb++] = blk[i];
	}
	s->len = s->hit = hit;
	return hit;
}

/* Computes positions [len, to): like a successful ds_engine_step, or
 * -ENOSPC with nothing changed. */
static int s_run(world *w, fseq *s, int to)
{
	int need = (to + w->bt - 1) / w->bt, had = s->nb;
	while (s->nb < need) {
		int32_t b = ds_kv_pool_alloc(w->pool);
		if (b < 0) {
			while (s->nb > had)
				ds_kv_pool_unref(w->pool, s->blocks[--s->nb]);
			return b;
		}
		assert_int_equal(ds_kv_pool_refcount(w->pool, b), 1);
		s->blocks[s->nb++] = b;
	}
	for (int p = s->len; p < to; p++)
		w->kv[(size_t)s->blocks[p / w->bt] * w->bt + p % w->bt] = kv_at(s, p);
	s->len = to;
	return 0;
}

static int s_insert(world *w, fseq *s)
{
	return w->pc ? ds_prefix_insert(w->pc, s->tok, s->len, s->blocks, s->nb) : 0;
}

static void s_free(world *w, fseq *s)
{
	for (int i = 0; i < s->nb; i++)
		ds_kv_pool_unref(w->pool, s->blocks[i]);
	s->nb = s->len = 0;
}

static void fill(fseq *s, int n, int32_t base)
{
	s->n = n;
	for (int i = 0; i < n; i++)
		s->tok[i] = base + i;
}

static ds_prefix_stats stats(const world *w)
{
	ds_prefix_stats st;
	ds_prefix_stats_get(w->pc, &st);
	assert_int_equal(st.blocks_used + st.blocks_cached + st.blocks_free, st.blocks_total);
	return st;
}

static void test_lookup_full_blocks_only(void **st)
{
	(void)st;
	world w;
	w_open(&w, 16, 4, 1);
	fseq *a = calloc(1, sizeof(*a)), *b = calloc(1, sizeof(*b));
	fill(a, 14, 100);
	assert_int_equal(s_start(&w, a), 0);
	assert_int_equal(s_run(&w, a, 14), 0);
	assert_int_equal(s_insert(&w, a), 3); /* 3 full blocks, the partial one is not shared */
	assert_int_equal(s_insert(&w, a), 0); /* idempotent */
	check(&w);
	int32_t blk[8];
	/* the same prompt: 3 blocks (13 tokens would still leave one to compute) */
	assert_int_equal(ds_prefix_lookup(w.pc, a->tok, 14, blk, 8), 12);
	assert_memory_equal(blk, a->blocks, 3 * sizeof(int32_t));
	/* exactly 12 tokens: the last must be computed, so only 2 blocks */
	assert_int_equal(ds_prefix_lookup(w.pc, a->tok, 12, blk, 8), 8);
	assert_int_equal(ds_prefix_lookup(w.pc, a->tok, 13, blk, 8), 12);
	assert_int_equal(ds_prefix_lookup(w.pc, a->tok, 14, blk, 1), 4);
	assert_int_equal(ds_prefix_lookup(w.pc, a->tok, 0, blk, 8), 0);
	/* a differing token in block 1 stops the match after block 0 */
	*b = *a;
	b->tok[6] = 7;
	assert_int_equal(ds_prefix_lookup(w.pc, b->tok, 14, blk, 8), 4);
	/* same tokens at another depth do not match (the key is the whole path) */
	fill(b, 10, 104);
	assert_int_equal(ds_prefix_lookup(w.pc, b->tok, 10, blk, 8), 0);
	assert_int_equal(ds_prefix_lookup(NULL, b->tok, 10, blk, 8), -EINVAL);
	assert_int_equal(ds_prefix_insert(w.pc, b->tok, -1, blk, 1), -EINVAL);
	s_free(&w, a);
	ds_prefix_stats s = stats(&w);
	assert_int_equal(s.blocks_cached, 3);
	assert_int_equal(s.blocks_used, 0);
	assert_int_equal(s.nodes, 3);
	free(a);
	free(b);
	w_close(&w);
}

/* References: a hit takes one per block; cancelling a request at any point
 * leaves cached blocks cached and private blocks free. */
static void test_refcounts_under_cancel(void **st)
{
	(void)st;
	world w;
	w_open(&w, 16, 4, 1);
	fseq *a = calloc(1, sizeof(*a)), *b = calloc(1, sizeof(*b)), *c = calloc(1, sizeof(*c));
	fill(a, 10, 1);
	s_start(&w, a);
	assert_int_equal(s_run(&w, a, 10), 0);
	assert_int_equal(s_insert(&w, a), 2);
	*b = *a;
	b->n = 11;
	b->tok[10] = 99;
	assert_int_equal(s_start(&w, b), 8);
	assert_int_equal(ds_kv_pool_refcount(w.pool, a->blocks[0]), 2);
	assert_int_equal(ds_kv_pool_refcount(w.pool, a->blocks[1]), 2);
	ds_prefix_stats s = stats(&w);
	assert_int_equal(s.blocks_used, 3);
	assert_int_equal(s.blocks_cached, 0);
	/* a finishes: its shared blocks stay used by b, its tail block is freed */
	s_free(&w, a);
	check(&w);
	s = stats(&w);
	assert_int_equal(s.blocks_used, 2);
	assert_int_equal(s.blocks_cached, 0);
	assert_int_equal(s.blocks_free, 14);
	/* b is cancelled before computing anything: the blocks are cached, not lost */
	s_free(&w, b);
	check(&w);
	s = stats(&w);
	assert_int_equal(s.blocks_used, 0);
	assert_int_equal(s.blocks_cached, 2);
	/* c hits, computes, cancels mid-prefill (allocation failure undone) */
	*c = *b;
	c->n = 70;
	for (int i = 11; i < 70; i++)
		c->tok[i] = 500 + i;
	assert_int_equal(s_start(&w, c), 8);
	assert_int_equal(stats(&w).blocks_cached, 0);
	assert_int_equal(s_run(&w, c, 70), -ENOSPC); /* 16 more blocks, 14 free + 0 cached */
	assert_int_equal(c->nb, 2);
	check(&w);
	assert_int_equal(s_run(&w, c, 40), 0);
	assert_int_equal(s_insert(&w, c), 8);
	s_free(&w, c);
	check(&w);
	s = stats(&w);
	assert_int_equal(s.blocks_cached, 10);
	assert_int_equal(s.blocks_free, 6);
	/* a ref on a free block is refused, so it cannot be handed out twice */
	int32_t fb = ds_kv_pool_alloc(w.pool);
	ds_kv_pool_unref(w.pool, fb);
	ds_kv_pool_ref(w.pool, fb);
	assert_int_equal(ds_kv_pool_refcount(w.pool, fb), 0);
	check(&w);
	free(a);
	free(b);
	free(c);
	w_close(&w);
}

/* Three chains released in order A, B, C; then A is used again. Allocations
 * past the free list evict the least recently released leaves first: B's
 * deepest block, then up B's chain, then C, then A. */
static void test_eviction_order(void **st)
{
	(void)st;
	world w;
	w_open(&w, 9, 2, 1);
	fseq *s[3];
	for (int i = 0; i < 3; i++) {
		s[i] = calloc(1, sizeof(*s[i]));
		fill(s[i], 7, 100 * (i + 1)); /* 3 full blocks + 1 partial */
	}
	for (int i = 0; i < 3; i++) {
		s_start(&w, s[i]);
		assert_int_equal(s_run(&w, s[i], 6), 0);
		assert_int_equal(s_insert(&w, s[i]), 3);
	}
	int32_t chain[3][3];
	for (int i = 0; i < 3; i++) {
		memcpy(chain[i], s[i]->blocks, sizeof(chain[i]));
		s_free(&w, s[i]);
	}
	assert_int_equal(stats(&w).blocks_cached, 9);
	assert_int_equal(stats(&w).blocks_free, 0);
	/* touch A: a hit and a release makes it the most recent */
	assert_int_equal(s_start(&w, s[0]), 6);
	s_free(&w, s[0]);
	check(&w);
	/* order of release ticks: B0 B1 B2 C0 C1 C2 A0 A1 A2; leaves: B2 C2 A2 */
	int32_t want[9] = { chain[1][2], chain[1][1], chain[1][0], chain[2][2], chain[2][1], chain[2][0],
			    chain[0][2], chain[0][1], chain[0][0] };
	for (int i = 0; i < 9; i++) {
		int32_t b = ds_kv_pool_alloc(w.pool);
		assert_int_equal(b, want[i]);
		check(&w);
		ds_prefix_stats x = stats(&w);
		assert_int_equal(x.evictions, (uint64_t)(i + 1));
		assert_int_equal(x.blocks_used, i + 1);
	}
	assert_int_equal(ds_kv_pool_alloc(w.pool), -ENOSPC);
	int32_t blk[4];
	assert_int_equal(ds_prefix_lookup(w.pc, s[0]->tok, 7, blk, 4), 0);
	for (int i = 0; i < 9; i++)
		ds_kv_pool_unref(w.pool, want[i]);
	for (int i = 0; i < 3; i++)
		free(s[i]);
	w_close(&w);
}

/* A shared system prompt P with two continuations X (released first) and Y:
 * X goes before P's other child, P only once it is a leaf, and a block in
 * use is never evicted. */
static void test_eviction_keeps_shared_parent(void **st)
{
	(void)st;
	world w;
	w_open(&w, 6, 4, 1);
	fseq *x = calloc(1, sizeof(*x)), *y = calloc(1, sizeof(*y)), *z = calloc(1, sizeof(*z));
	fill(x, 9, 10);
	*y = *x;
	for (int i = 4; i < 9; i++)
		y->tok[i] = 900 + i;
	s_start(&w, x);
	s_run(&w, x, 8);
	s_insert(&w, x);
	assert_int_equal(s_start(&w, y), 4);
	s_run(&w, y, 8);
	assert_int_equal(s_insert(&w, y), 1);
	int32_t P = x->blocks[0], X = x->blocks[1], Y = y->blocks[1];
	s_free(&w, x);
	/* y still holds P and Y: only X is evictable */
	fill(z, 17, 5000);
	s_start(&w, z);
	assert_int_equal(s_run(&w, z, 16), 0); /* 3 free + X */
	assert_int_equal(z->blocks[3], X);
	check(&w);
	int32_t blk[4];
	assert_int_equal(ds_prefix_lookup(w.pc, x->tok, 9, blk, 4), 4);
	assert_int_equal(blk[0], P);
	assert_int_equal(s_run(&w, z, 17), -ENOSPC);
	s_free(&w, y); /* order: P then Y, so P is older, but it has a child */
	assert_int_equal(s_run(&w, z, 17), 0);
	assert_int_equal(z->blocks[4], Y);
	check(&w);
	assert_int_equal(ds_prefix_lookup(w.pc, y->tok, 9, blk, 4), 4);
	assert_int_equal(stats(&w).blocks_cached, 1);
	s_free(&w, z);
	free(x);
	free(y);
	free(z);
	w_close(&w);
}

/* Two sequences compute the same tokens into different blocks: one copy is
 * cached, the other stays private, and a longer duplicate hangs its extra
 * blocks under the cached path; evicting a cached block whose subtree is in
 * use makes that subtree private without breaking the accounting. */
static void test_duplicate_and_detached_subtree(void **st)
{
	(void)st;
	world w;
	w_open(&w, 12, 4, 1);
	fseq *a = calloc(1, sizeof(*a)), *b = calloc(1, sizeof(*b)), *c = calloc(1, sizeof(*c));
	fill(a, 5, 1);
	fill(b, 13, 1);
	s_start(&w, a);
	s_start(&w, b); /* both miss: they start together */
	s_run(&w, a, 5);
	s_run(&w, b, 13);
	assert_int_equal(s_insert(&w, a), 1);
	assert_int_equal(s_insert(&w, b), 2); /* b's block 0 is a duplicate: 1, 2 go under a's */
	check(&w);
	int32_t blk[4];
	assert_int_equal(ds_prefix_lookup(w.pc, b->tok, 13, blk, 4), 12);
	assert_int_equal(blk[0], a->blocks[0]);
	assert_int_equal(blk[1], b->blocks[1]);
	s_free(&w, a); /* a's block 0 is cached, with a child used by b */
	check(&w);
	assert_int_equal(stats(&w).blocks_cached, 1);
	/* fill the pool: the only cached block is not a leaf */
	fill(c, 33, 7000);
	s_start(&w, c);
	assert_int_equal(s_run(&w, c, 32), 0); /* 7 free + the cached one */
	check(&w);
	assert_int_equal(stats(&w).blocks_cached, 0);
	assert_int_equal(stats(&w).nodes, 0);
	assert_int_equal(ds_prefix_lookup(w.pc, b->tok, 13, blk, 4), 0);
	s_free(&w, b); /* its formerly cached blocks go straight to the free list */
	check(&w);
	assert_int_equal(stats(&w).blocks_free, 4);
	s_free(&w, c);
	free(a);
	free(b);
	free(c);
	w_close(&w);
}

static void test_flush(void **st)
{
	(void)st;
	world w;
	w_open(&w, 16, 4, 1);
	fseq *a = calloc(1, sizeof(*a)), *b = calloc(1, sizeof(*b));
	fill(a, 17, 1);
	fill(b, 17, 100);
	s_start(&w, a);
	s_run(&w, a, 17);
	s_insert(&w, a);
	s_start(&w, b);
	s_run(&w, b, 17);
	s_insert(&w, b);
	s_free(&w, a); /* a's 4 blocks cached, b's in use */
	assert_int_equal(ds_prefix_flush(w.pc), 4);
	check(&w);
	ds_prefix_stats s = stats(&w);
	assert_int_equal(s.blocks_cached, 0);
	assert_int_equal(s.nodes, 0);
	assert_int_equal(s.blocks_used, 5);
	assert_int_equal(s.evictions, 0);
	int32_t blk[4];
	assert_int_equal(ds_prefix_lookup(w.pc, b->tok, 17, blk, 4), 0);
	s_free(&w, b);
	assert_int_equal(stats(&w).blocks_free, 16);
	/* usable after a flush */
	s_start(&w, a);
	s_run(&w, a, 17);
	assert_int_equal(s_insert(&w, a), 4);
	s_free(&w, a);
	assert_int_equal(s_start(&w, a), 16);
	s_free(&w, a);
	free(a);
	free(b);
	w_close(&w); /* frees the cache with blocks cached: all return to the pool */
}

static void test_account(void **st)
{
	(void)st;
	world w;
	w_open(&w, 4, 4, 1);
	ds_prefix_account(w.pc, 100, 64);
	ds_prefix_account(w.pc, 50, 0);
	ds_prefix_account(w.pc, 5, 6); /* nonsense is ignored */
	ds_prefix_stats s = stats(&w);
	assert_int_equal(s.prompt_tokens, 150);
	assert_int_equal(s.hit_tokens, 64);
	assert_int_equal(s.blocks_total, 4);
	w_close(&w);
}

/* Many requests over a few shared prefixes, random lengths, random cancels,
 * a small pool: every hit serves the right KV, the accounting holds after
 * every operation, and at the end no block is in use. */
static void stress(int with_cache, unsigned seed, uint64_t *hits_out)
{
	enum { NS = 24, NBLK = 96, BT = 4 };
	world w;
	w_open(&w, NBLK, BT, with_cache);
	srand(seed);
	fseq **s = calloc(NS, sizeof(*s));
	int *active = calloc(NS, sizeof(int));
	int32_t prefixes[4][64];
	for (int p = 0; p < 4; p++)
		for (int i = 0; i < 64; i++)
			prefixes[p][i] = rand() % 50;
	uint64_t hits = 0;
	for (int i = 0; i < NS; i++)
		s[i] = calloc(1, sizeof(*s[i]));
	for (int op = 0; op < 20000; op++) {
		int i = rand() % NS;
		fseq *q = s[i];
		int r = rand() % 100;
		if (!active[i]) {
			/* new request: shared prefix of random length + own tokens */
			int p = rand() % 4, pl = rand() % 64, n = pl + 1 + rand() % 40;
			q->n = n;
			for (int k = 0; k < n; k++)
				q->tok[k] = k < pl ? prefixes[p][k] : rand() % 50;
			hits += (uint64_t)s_start(&w, q);
			active[i] = 1;
		} else if (r < 8) {
			s_free(&w, q); /* cancel / disconnect */
			active[i] = 0;
		} else if (q->len < q->n) {
			int to = q->len + 1 + rand() % 16;
			if (to > q->n)
				to = q->n;
			if (s_run(&w, q, to) == -ENOSPC) {
				s_free(&w, q); /* preempted */
				active[i] = 0;
			} else if (rand() % 2) {
				s_insert(&w, q);
			}
		} else if (q->n < MAXT - 1 && rand() % 4) {
			q->tok[q->n++] = rand() % 50; /* decode */
		} else {
			s_insert(&w, q);
			s_free(&w, q);
			active[i] = 0;
		}
		check(&w);
		if (rand() % 1000 == 0 && w.pc)
			ds_prefix_flush(w.pc);
	}
	for (int i = 0; i < NS; i++) {
		s_free(&w, s[i]);
		free(s[i]);
	}
	check(&w);
	if (w.pc) {
		ds_prefix_stats st = stats(&w);
		assert_int_equal(st.blocks_used, 0);
		assert_int_equal(st.blocks_free + st.blocks_cached, NBLK);
		assert_true(st.evictions > 0);
	} else {
		assert_int_equal(ds_kv_pool_free_count(w.pool), NBLK);
	}
	*hits_out = hits;
	free(s);
	free(active);
	w_close(&w);
}

static void test_stress(void **st)
{
	(void)st;
	for (unsigned seed = 1; seed <= 6; seed++) {
		uint64_t hits = 0, none = 0;
		stress(1, seed, &hits);
		stress(0, seed, &none);
		assert_int_equal(none, 0);
		if (hits == 0)
			fail_msg("seed %u: no prefix hits in the stress run", seed);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_lookup_full_blocks_only),
		cmocka_unit_test(test_refcounts_under_cancel),
		cmocka_unit_test(test_eviction_order),
		cmocka_unit_test(test_eviction_keeps_shared_parent),
		cmocka_unit_test(test_duplicate_and_detached_subtree),
		cmocka_unit_test(test_flush),
		cmocka_unit_test(test_account),
		cmocka_unit_test(test_stress),
	};
	return cmocka_run_group_tests_name("prefix", tests, NULL, NULL);
}

/* The CPU reference engine against transformers (tests/fixtures, made by
 * tools/make_fixtures.py) and against itself: KV-cache decode equals the
 * full forward, a batch equals each sequence alone, chunked prefill and
 * rollback change nothing. */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "model/engine.h"
#include "tests/fixture_util.h"

typedef struct {
	fx_ref ref;
	ds_model *m;
	ds_engine *eng;
} fx;

static fx *fx_open(const char *name, int kv_blocks, int block_tokens)
{
	fx *f = calloc(1, sizeof(*f));
	assert_int_equal(fx_load(name, &f->ref), 0);
	ds_err e = { { 0 } };
	int rc = ds_model_open(f->ref.dir, 0, &f->m, &e);
	if (rc)
		fail_msg("%s", e.msg);
	ds_engine_config c;
	ds_engine_config_default(&c);
	c.threads = 2;
	c.kv_blocks = kv_blocks;
	c.block_tokens = block_tokens;
	rc = ds_engine_create(f->m, &c, &f->eng, &e);
	if (rc)
		fail_msg("%s", e.msg);
	return f;
}

static void fx_close(fx *f)
{
	ds_engine_free(f->eng);
	ds_model_free(f->m);
	fx_free(&f->ref);
	free(f);
}

static float max_abs_diff(const float *a, const float *b, size_t n)
{
	float d = 0;
	for (size_t i = 0; i < n; i++) {
		float x = fabsf(a[i] - b[i]);
		if (!(x <= d)) /* NaN counts as a difference */
			d = isnan(x) ? INFINITY : x;
	}
	return d;
}

/* Full forward of ids; logits [n][V], hidden [n][H] (optional). */
static float *forward_all(fx *f, const int32_t *ids, int n, float **hidden)
{
	const int V = f->m->cfg.vocab_size, H = f->m->cfg.hidden_size;
	float *lg = malloc(sizeof(float) * (size_t)n * V);
	if (hidden)
		*hidden = malloc(sizeof(float) * (size_t)n * H);
	ds_seq *s;
	assert_int_equal(ds_seq_new(f->eng, &s), 0);
	ds_step_item it = { .seq = s, .tokens = ids, .n = n, .logits = DS_LOGITS_ALL };
	ds_err e = { { 0 } };
	int rc = ds_engine_step(f->eng, &it, 1, lg, hidden ? *hidden : NULL, &e);
	if (rc)
		fail_msg("step: %s", e.msg);
	ds_seq_free(s);
	return lg;
}

static void check_logits(const char *name, int with_mtp)
{
	fx *f = fx_open(name, 0, 16);
	const int V = f->m->cfg.vocab_size;
	float worst = 0, worst_mtp = 0;
	int checked_mtp = 0;
	for (int i = 0; i < f->ref.n_seqs; i++) {
		fx_seq *q = &f->ref.seqs[i];
		float *ref, *hidden;
		size_t r, c;
		assert_int_equal(fx_npy(&f->ref, q->logits, &ref, &r, &c), 0);
		assert_int_equal((int)r, q->n);
		assert_int_equal((int)c, V);
		float *lg = forward_all(f, q->ids, q->n, &hidden);
		float d = max_abs_diff(lg, ref, r * c);
		if (d > worst)
			worst = d;
		if (d > 1e-3f)
			fail_msg("%s/%s: max |logit diff| %g > 1e-3", name, q->name, d);
		if (with_mtp && q->mtp_logits[0] && q->n >= 2) {
			float *mref;
			assert_int_equal(fx_npy(&f->ref, q->mtp_logits, &mref, &r, &c), 0);
			assert_int_equal((int)r, q->n - 1);
			ds_seq *s;
			assert_int_equal(ds_seq_new(f->eng, &s), 0);
			ds_step_item it = { .seq = s, .tokens = q->ids, .n = q->n, .logits = DS_LOGITS_NONE };
			ds_err e = { { 0 } };
			assert_int_equal(ds_engine_step(f->eng, &it, 1, NULL, NULL, &e), 0);
			ds_step_item mt = { .seq = s, .tokens = q->ids + 1, .n = q->n - 1, .logits = DS_LOGITS_ALL };
			float *ml = malloc(sizeof(float) * r * c);
			if (ds_engine_mtp_step(f->eng, 0, &mt, 1, hidden, ml, NULL, &e))
				fail_msg("mtp: %s", e.msg);
			float dm = max_abs_diff(ml, mref, r * c);
			if (dm > worst_mtp)
				worst_mtp = dm;
			if (dm > 1e-3f)
				fail_msg("%s/%s: MTP max |logit diff| %g > 1e-3", name, q->name, dm);
			checked_mtp++;
			ds_seq_free(s);
			free(ml);
			free(mref);
		}
		free(lg);
		free(hidden);
		free(ref);
	}
	if (with_mtp)
		assert_true(checked_mtp > 0);
	print_message("%s: %d sequences, max |logit diff| %.3g; MTP %d sequences, max %.3g\n", name, f->ref.n_seqs,
		      worst, checked_mtp, worst_mtp);
	fx_close(f);
}

static void test_logits_v3(void **st) { (void)st; check_logits("v3", 1); }
static void test_logits_v2lite(void **st) { (void)st; check_logits("v2lite", 0); }
static void test_logits_fp8(void **st) { (void)st; check_logits("fp8", 1); }

/* Greedy continuation equals the reference wherever its top-2 margin
 * exceeds 1e-3 (after a near-tie the sequences may legitimately differ). */
static void check_greedy(const char *name)
{
	fx *f = fx_open(name, 0, 16);
	const int V = f->m->cfg.vocab_size;
	int checked = 0;
	float *lg = malloc(sizeof(float) * (size_t)V);
	for (int i = 0; i < f->ref.n_seqs; i++) {
		fx_seq *q = &f->ref.seqs[i];
		if (!q->n_greedy)
			continue;
		ds_seq *s;
		assert_int_equal(ds_seq_new(f->eng, &s), 0);
		ds_step_item it = { .seq = s, .tokens = q->ids, .n = q->greedy_prompt_len, .logits = DS_LOGITS_LAST };
		ds_err e = { { 0 } };
		for (int j = 0; j < q->n_greedy; j++) {
			assert_int_equal(ds_engine_step(f->eng, &it, 1, lg, NULL, &e), 0);
			int best = 0;
			for (int v = 1; v < V; v++)
				if (lg[v] > lg[best])
					best = v;
			if (q->greedy_margins[j] <= 1e-3f)
				break;
			if (best != q->greedy_ids[j])
				fail_msg("%s/%s: greedy token %d is %d, reference %d (margin %g)", name, q->name, j, best,
					 q->greedy_ids[j], q->greedy_margins[j]);
			checked++;
			it = (ds_step_item){ .seq = s, .tokens = &q->greedy_ids[j], .n = 1, .logits = DS_LOGITS_LAST };
		}
		ds_seq_free(s);
	}
	assert_true(checked >= 8);
	free(lg);
	fx_close(f);
}

static void test_greedy_v3(void **st) { (void)st; check_greedy("v3"); }
static void test_greedy_v2lite(void **st) { (void)st; check_greedy("v2lite"); }
static void test_greedy_fp8(void **st) { (void)st; check_greedy("fp8"); }

static const fx_seq *longest(const fx *f)
{
	const fx_seq *b = &f->ref.seqs[0];
	for (int i = 1; i < f->ref.n_seqs; i++)
		if (f->ref.seqs[i].n > b->n)
			b = &f->ref.seqs[i];
	return b;
}

/* Token-by-token decoding through the KV cache (blocks of 16, so tables span
 * several blocks) equals the full forward. */
static void test_kv_decode_equals_full(void **st)
{
	(void)st;
	const char *names[] = { "v3", "v2lite", "fp8" };
	for (int k = 0; k < 3; k++) {
		fx *f = fx_open(names[k], 0, 16);
		const fx_seq *q = longest(f);
		const int V = f->m->cfg.vocab_size;
		float *full = forward_all(f, q->ids, q->n, NULL);
		float *row = malloc(sizeof(float) * (size_t)V);
		ds_seq *s;
		assert_int_equal(ds_seq_new(f->eng, &s), 0);
		float worst = 0;
		for (int t = 0; t < q->n; t++) {
			ds_step_item it = { .seq = s, .tokens = &q->ids[t], .n = 1, .logits = DS_LOGITS_LAST };
			assert_int_equal(ds_engine_step(f->eng, &it, 1, row, NULL, NULL), 0);
			float d = max_abs_diff(row, full + (size_t)t * V, (size_t)V);
			worst = d > worst ? d : worst;
		}
		assert_int_equal(ds_seq_len(s), q->n);
		if (worst > 1e-4f)
			fail_msg("%s: decode vs full forward differ by %g", names[k], worst);
		ds_seq_free(s);
		free(row);
		free(full);
		fx_close(f);
	}
}

/* Three sequences of different lengths in one step, then mixed decode and
 * prefill-chunk steps, equal each sequence run alone. */
/* ds_engine_step_ids: argmax rows on the CPU backend (tests/fixture_util.c). */
static void test_step_ids(void **st)
{
	(void)st;
	fx *f = fx_open("v3", 0, 16);
	const fx_seq *q = NULL;
	for (int i = 0; i < f->ref.n_seqs; i++)
		if (f->ref.seqs[i].n >= 24)
			q = &f->ref.seqs[i];
	assert_non_null(q);
	char why[256] = "";
	if (fx_check_step_ids(f->eng, q->ids, q->n, why, sizeof(why)))
		fail_msg("%s", why);
	fx_close(f);
}

/* ds_engine_step_chain on the CPU: the engine runs the steps itself; the
 * same ids and KV bookkeeping as the caller running them, at depths 1-4. */
static void test_step_chain(void **st)
{
	(void)st;
	fx *f = fx_open("v3", 0, 16);
	int32_t ids[32];
	for (int i = 0; i < 32; i++)
		ids[i] = (int32_t)((i * 7919u + 13u) % (unsigned)f->m->cfg.vocab_size);
	char why[256] = "";
	for (int depth = 1; depth <= 4; depth++)
		if (fx_check_step_chain(f->eng, ids, 32, depth, why, sizeof(why)))
			fail_msg("depth %d: %s", depth, why);
	fx_close(f);
}

/* Chained passes past depth 1 write MTP KV ahead of the step's positions:
 * at the end of the context a depth whose positions do not fit is refused
 * (-E2BIG) with nothing changed, and the deepest that fits runs. */
static void test_step_chain_context_end(void **st)
{
	(void)st;
	fx *f = fx_open("v3", 0, 16);
	const int V = f->m->cfg.vocab_size, H = f->m->cfg.hidden_size, P = f->m->cfg.max_position_embeddings;
	const int n = P - 3; /* positions 0 .. P-4 cached; the step feeds 2 */
	int32_t *ids = malloc(sizeof(int32_t) * (size_t)(n + 1));
	float *hid = malloc(sizeof(float) * (size_t)n * H), *lg = malloc(sizeof(float) * (size_t)2 * V);
	assert_non_null(ids);
	assert_non_null(hid);
	assert_non_null(lg);
	for (int i = 0; i <= n; i++)
		ids[i] = (int32_t)((i * 7919u + 13u) % (unsigned)V);
	ds_seq *s;
	ds_err e = { { 0 } };
	assert_int_equal(ds_seq_new(f->eng, &s), 0);
	ds_step_item it = { .seq = s, .tokens = ids, .n = n, .logits = DS_LOGITS_NONE };
	assert_int_equal(ds_engine_step(f->eng, &it, 1, NULL, hid, &e), 0);
	it.tokens = ids + 1; /* the MTP KV level with the main KV */
	assert_int_equal(ds_engine_mtp_step(f->eng, 0, &it, 1, hid, NULL, NULL, &e), 0);
	int nb;
	ds_seq_blocks(s, &nb);
	int32_t out[2], mids[2 + 3];
	ds_step_item c = { .seq = s, .tokens = ids + n - 1, .n = 2, .logits = DS_LOGITS_ALL, .argmax_only = 1 };
	/* positions P-3, P-2 and depth - 1 ahead: depth 3 reaches P */
	assert_int_equal(ds_engine_step_chain(f->eng, &c, 1, 1, 3, lg, out, mids, NULL, &e), -E2BIG);
	int nb2;
	ds_seq_blocks(s, &nb2);
	assert_int_equal(ds_seq_len(s), n);
	assert_int_equal(ds_seq_mtp_len(s), n);
	assert_int_equal(nb2, nb);
	e.msg[0] = 0;
	assert_int_equal(ds_engine_step_chain(f->eng, &c, 1, 1, 2, lg, out, mids, NULL, &e), 0);
	assert_int_equal(ds_seq_len(s), n + 2);
	/* level with the accepted prefix: row 0's argmax against the draft */
	assert_int_equal(ds_seq_mtp_len(s), n + 1 + (out[0] == ids[n]));
	ds_seq_free(s);
	free(ids);
	free(hid);
	free(lg);
	fx_close(f);
}

static void test_batch_equals_alone(void **st)
{
	(void)st;
	fx *f = fx_open("v3", 0, 16);
	const int V = f->m->cfg.vocab_size;
	const fx_seq *q[3];
	int nq = 0;
	for (int i = 0; i < f->ref.n_seqs && nq < 3; i++)
		if (f->ref.seqs[i].n >= 7)
			q[nq++] = &f->ref.seqs[i];
	assert_int_equal(nq, 3);
	float *alone[3];
	for (int i = 0; i < 3; i++)
		alone[i] = forward_all(f, q[i]->ids, q[i]->n, NULL);
	ds_seq *s[3];
	for (int i = 0; i < 3; i++)
		assert_int_equal(ds_seq_new(f->eng, &s[i]), 0);
	/* step 1: seq0 prefix of 5, seq1 prefix of 3, seq2 prefix of 6 (logits: all) */
	int done[3] = { 5, 3, 6 };
	ds_step_item it[3];
	for (int i = 0; i < 3; i++)
		it[i] = (ds_step_item){ .seq = s[i], .tokens = q[i]->ids, .n = done[i], .logits = DS_LOGITS_ALL };
	float *lg = malloc(sizeof(float) * (size_t)V * 64);
	assert_int_equal(ds_engine_step(f->eng, it, 3, lg, NULL, NULL), 0);
	float worst = 0;
	size_t row = 0;
	for (int i = 0; i < 3; i++)
		for (int t = 0; t < done[i]; t++, row++) {
			float d = max_abs_diff(lg + row * V, alone[i] + (size_t)t * V, (size_t)V);
			worst = d > worst ? d : worst;
		}
	/* then steps where seq0 decodes one token, seq1 takes a chunk of 2 and
	 * seq2 one token, until all are complete */
	for (;;) {
		int n_it = 0, want[3] = { 0 }, idx[3];
		for (int i = 0; i < 3; i++) {
			int left = q[i]->n - done[i];
			if (left <= 0)
				continue;
			int take = (i == 1 && left >= 2) ? 2 : 1;
			want[n_it] = take;
			idx[n_it] = i;
			it[n_it++] = (ds_step_item){ .seq = s[i], .tokens = q[i]->ids + done[i], .n = take, .logits = DS_LOGITS_ALL };
		}
		if (!n_it)
			break;
		assert_int_equal(ds_engine_step(f->eng, it, n_it, lg, NULL, NULL), 0);
		row = 0;
		for (int j = 0; j < n_it; j++) {
			int i = idx[j];
			for (int t = 0; t < want[j]; t++, row++) {
				float d = max_abs_diff(lg + row * V, alone[i] + (size_t)(done[i] + t) * V, (size_t)V);
				worst = d > worst ? d : worst;
			}
			done[i] += want[j];
		}
	}
	if (worst > 1e-4f)
		fail_msg("batched vs alone differ by %g", worst);
	for (int i = 0; i < 3; i++) {
		ds_seq_free(s[i]);
		free(alone[i]);
	}
	free(lg);
	fx_close(f);
}

/* Rolling back positions (as speculative decoding does) and feeding other
 * tokens gives what a fresh sequence gives; blocks return to the pool. */
static void test_truncate_rollback(void **st)
{
	(void)st;
	fx *f = fx_open("v3", 8, 16);
	ds_kv_pool *pool = ds_engine_pool(f->eng);
	const int V = f->m->cfg.vocab_size;
	const fx_seq *q = longest(f);
	assert_true(q->n >= 40);
	float *full = forward_all(f, q->ids, 40, NULL);
	assert_int_equal(ds_kv_pool_free_count(pool), 8);
	ds_seq *s;
	assert_int_equal(ds_seq_new(f->eng, &s), 0);
	int32_t wrong[20];
	for (int i = 0; i < 20; i++)
		wrong[i] = (q->ids[20 + i] + 7) % V;
	ds_step_item a = { .seq = s, .tokens = q->ids, .n = 20, .logits = DS_LOGITS_NONE };
	assert_int_equal(ds_engine_step(f->eng, &a, 1, NULL, NULL, NULL), 0);
	ds_step_item b = { .seq = s, .tokens = wrong, .n = 20, .logits = DS_LOGITS_NONE };
	assert_int_equal(ds_engine_step(f->eng, &b, 1, NULL, NULL, NULL), 0);
	assert_int_equal(ds_kv_pool_free_count(pool), 8 - 3);
	assert_int_equal(ds_seq_truncate(s, 20), 0);
	assert_int_equal(ds_kv_pool_free_count(pool), 8 - 2);
	float *lg = malloc(sizeof(float) * (size_t)V * 20);
	ds_step_item c = { .seq = s, .tokens = q->ids + 20, .n = 20, .logits = DS_LOGITS_ALL };
	assert_int_equal(ds_engine_step(f->eng, &c, 1, lg, NULL, NULL), 0);
	float d = max_abs_diff(lg, full + (size_t)20 * V, (size_t)20 * V);
	if (d > 1e-4f)
		fail_msg("after rollback logits differ by %g", d);
	ds_seq_free(s);
	assert_int_equal(ds_kv_pool_free_count(pool), 8);
	free(lg);
	free(full);
	fx_close(f);
}

/* A pool too small for a step refuses it with -ENOSPC and changes nothing. */
static void test_pool_full(void **st)
{
	(void)st;
	fx *f = fx_open("v2lite", 2, 16);
	ds_kv_pool *pool = ds_engine_pool(f->eng);
	const fx_seq *q = longest(f);
	ds_seq *s, *t;
	assert_int_equal(ds_seq_new(f->eng, &s), 0);
	assert_int_equal(ds_seq_new(f->eng, &t), 0);
	ds_step_item a = { .seq = s, .tokens = q->ids, .n = 20, .logits = DS_LOGITS_NONE };
	assert_int_equal(ds_engine_step(f->eng, &a, 1, NULL, NULL, NULL), 0);
	ds_step_item b[2] = { { .seq = s, .tokens = q->ids + 20, .n = 1, .logits = DS_LOGITS_NONE },
			      { .seq = t, .tokens = q->ids, .n = 1, .logits = DS_LOGITS_NONE } };
	ds_err e = { { 0 } };
	assert_int_equal(ds_engine_step(f->eng, b, 2, NULL, NULL, &e), -ENOSPC);
	assert_int_equal(ds_seq_len(s), 20);
	assert_int_equal(ds_seq_len(t), 0);
	assert_int_equal(ds_kv_pool_free_count(pool), 0);
	assert_int_equal(ds_engine_step(f->eng, b, 1, NULL, NULL, &e), 0);
	ds_seq_free(s);
	ds_seq_free(t);
	assert_int_equal(ds_kv_pool_free_count(pool), 2);
	fx_close(f);
}

/* A sequence started on adopted (shared) prefix blocks computes the same
 * logits, and writing past a shared partial block copies it first. */
static void test_adopt_shared_prefix(void **st)
{
	(void)st;
	fx *f = fx_open("v3", 0, 16);
	const int V = f->m->cfg.vocab_size;
	const fx_seq *q = longest(f);
	float *full = forward_all(f, q->ids, q->n, NULL);
	ds_seq *a, *b;
	assert_int_equal(ds_seq_new(f->eng, &a), 0);
	ds_step_item it = { .seq = a, .tokens = q->ids, .n = 24, .logits = DS_LOGITS_NONE };
	assert_int_equal(ds_engine_step(f->eng, &it, 1, NULL, NULL, NULL), 0);
	int nb;
	const int32_t *blk = ds_seq_blocks(a, &nb);
	assert_int_equal(nb, 2);
	assert_int_equal(ds_seq_new(f->eng, &b), 0);
	assert_int_equal(ds_seq_adopt_blocks(b, blk, nb, 24), 0);
	float *lg = malloc(sizeof(float) * (size_t)V * (size_t)q->n);
	int rest = q->n - 24;
	ds_step_item bt = { .seq = b, .tokens = q->ids + 24, .n = rest, .logits = DS_LOGITS_ALL };
	assert_int_equal(ds_engine_step(f->eng, &bt, 1, lg, NULL, NULL), 0);
	float d = max_abs_diff(lg, full + (size_t)24 * V, (size_t)rest * V);
	/* a continues with other tokens: its view must not see b's writes */
	int32_t other[8];
	for (int i = 0; i < 8; i++)
		other[i] = (q->ids[24 + i] + 3) % V;
	ds_step_item at = { .seq = a, .tokens = other, .n = 8, .logits = DS_LOGITS_NONE };
	assert_int_equal(ds_engine_step(f->eng, &at, 1, NULL, NULL, NULL), 0);
	ds_seq_free(b);
	assert_int_equal(ds_seq_new(f->eng, &b), 0);
	assert_int_equal(ds_seq_adopt_blocks(b, ds_seq_blocks(a, &nb), 2, 24), 0);
	bt.seq = b; /* the freed handle is gone; step the new one */
	assert_int_equal(ds_engine_step(f->eng, &bt, 1, lg, NULL, NULL), 0);
	float d2 = max_abs_diff(lg, full + (size_t)24 * V, (size_t)rest * V);
	if (d > 1e-4f || d2 > 1e-4f)
		fail_msg("shared-prefix continuation differs: %g / %g", d, d2);
	ds_seq_free(a);
	ds_seq_free(b);
	assert_int_equal(ds_kv_pool_free_count(ds_engine_pool(f->eng)), ds_kv_pool_blocks(ds_engine_pool(f->eng)));
	free(lg);
	free(full);
	fx_close(f);
}

/* Expert load counts every (token, expert) pair routed: a step of n tokens
 * adds n * top-k to each MoE layer of the main model and nothing to dense
 * layers; an MTP step adds to the MTP layer only. */
static void test_expert_load(void **st)
{
	(void)st;
	fx *f = fx_open("v3", 0, 16);
	const ds_model *m = f->m;
	const int E = m->cfg.n_routed_experts, K = m->cfg.num_experts_per_tok, NL = m->n_layers + m->n_mtp;
	const fx_seq *q = longest(f);
	uint64_t *c = calloc((size_t)NL * E, sizeof(uint64_t));
	float *hid = malloc(sizeof(float) * (size_t)q->n * m->cfg.hidden_size);
	ds_seq *s;
	assert_int_equal(ds_seq_new(f->eng, &s), 0);
	ds_step_item it = { .seq = s, .tokens = q->ids, .n = q->n, .logits = DS_LOGITS_NONE };
	assert_int_equal(ds_engine_step(f->eng, &it, 1, NULL, hid, NULL), 0);
	assert_int_equal(ds_engine_expert_load(f->eng, c), 0);
	for (int l = 0; l < NL; l++) {
		uint64_t sum = 0;
		for (int x = 0; x < E; x++)
			sum += c[(size_t)l * E + x];
		uint64_t want = l < m->n_layers && m->layers[l].is_moe ? (uint64_t)q->n * K : 0;
		if (sum != want)
			fail_msg("layer %d: %llu pairs counted, want %llu", l, (unsigned long long)sum, (unsigned long long)want);
	}
	assert_true(m->n_mtp > 0);
	ds_step_item mt = { .seq = s, .tokens = q->ids + 1, .n = q->n - 1, .logits = DS_LOGITS_NONE };
	assert_int_equal(ds_engine_mtp_step(f->eng, 0, &mt, 1, hid, NULL, NULL, NULL), 0);
	assert_int_equal(ds_engine_expert_load(f->eng, c), 0);
	uint64_t sum = 0;
	for (int x = 0; x < E; x++)
		sum += c[(size_t)m->n_layers * E + x];
	assert_int_equal(sum, m->layers[m->n_layers].is_moe ? (uint64_t)(q->n - 1) * K : 0);
	ds_seq_free(s);
	free(hid);
	free(c);
	fx_close(f);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_expert_load),
		cmocka_unit_test(test_logits_v3),
		cmocka_unit_test(test_logits_v2lite),
		cmocka_unit_test(test_logits_fp8),
		cmocka_unit_test(test_greedy_v3),
		cmocka_unit_test(test_greedy_v2lite),
		cmocka_unit_test(test_greedy_fp8),
		cmocka_unit_test(test_kv_decode_equals_full),
		cmocka_unit_test(test_batch_equals_alone),
		cmocka_unit_test(test_step_ids),
		cmocka_unit_test(test_step_chain),
		cmocka_unit_test(test_step_chain_context_end),
		cmocka_unit_test(test_truncate_rollback),
		cmocka_unit_test(test_pool_full),
		cmocka_unit_test(test_adopt_shared_prefix),
	};
	return cmocka_run_group_tests_name("engine", tests, NULL, NULL);
}

/* Speculative decoding with the MTP module: greedy output identical to plain
 * decoding across batch compositions and depths; sampling keeps the main
 * model's distribution (two-sample chi-square, alpha = 0.001); rollback
 * leaves the KV cache as a plain run would. Fixtures: tests/fixtures/v3, fp8. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "model/spec.h"
#include "tests/fixture_util.h"

typedef struct {
	ds_model *m;
	ds_engine *eng;
	fx_ref ref;
} env;

static void env_open(env *v, const char *name, int threads)
{
	memset(v, 0, sizeof(*v));
	assert_int_equal(fx_load(name, &v->ref), 0);
	ds_err e = { { 0 } };
	if (ds_model_open(v->ref.dir, 0, &v->m, &e))
		fail_msg("%s", e.msg);
	assert_true(v->m->n_mtp >= 1);
	ds_engine_config c;
	ds_engine_config_default(&c);
	c.threads = threads;
	c.block_tokens = 16;
	if (ds_engine_create(v->m, &c, &v->eng, &e))
		fail_msg("%s", e.msg);
}

static void env_close(env *v)
{
	ds_engine_free(v->eng);
	ds_model_free(v->m);
	fx_free(&v->ref);
}

typedef struct {
	ds_seq *seq;
	ds_sampler *smp;
	ds_spec_req r;
	int32_t out[256];
	int n;
} gen;

static void gen_init(env *v, gen *g, const ds_sampling *sp, int depth)
{
	memset(g, 0, sizeof(*g));
	assert_int_equal(ds_seq_new(v->eng, &g->seq), 0);
	assert_int_equal(ds_sampler_new(sp, v->m->cfg.vocab_size, &g->smp), 0);
	assert_int_equal(ds_spec_req_init(&g->r, v->eng, g->seq, g->smp, sp->temperature == 0, depth), 0);
}

static void gen_free(gen *g)
{
	ds_spec_req_clear(&g->r);
	ds_sampler_free(g->smp);
	ds_seq_free(g->seq);
}

static void take(gen *g, int want)
{
	for (int i = 0; i < g->r.n_out && g->n < want; i++)
		g->out[g->n++] = g->r.out[i];
}

/* Runs gens[0..n) together (prefill in one step, then joint spec steps)
 * until each has `want` tokens. */
static void run_together(env *v, gen *gs, int n, const int32_t *prompt, int plen, int want)
{
	ds_spec_req *rp[8];
	const int32_t *pp[8];
	int lens[8];
	for (int i = 0; i < n; i++) {
		rp[i] = &gs[i].r;
		pp[i] = prompt;
		lens[i] = plen;
	}
	ds_err e = { { 0 } };
	if (ds_spec_prefill(v->eng, rp, pp, lens, n, &e))
		fail_msg("prefill: %s", e.msg);
	for (int i = 0; i < n; i++)
		take(&gs[i], want);
	for (;;) {
		int k = 0;
		for (int i = 0; i < n; i++)
			if (gs[i].n < want)
				rp[k++] = &gs[i].r;
		if (!k)
			break;
		if (ds_spec_step(v->eng, rp, k, &e))
			fail_msg("step: %s", e.msg);
		for (int i = 0; i < n; i++)
			if (gs[i].n < want)
				take(&gs[i], want);
	}
}

static void greedy_identical(const char *name)
{
	env v;
	env_open(&v, name, 2);
	ds_sampling sp;
	ds_sampling_default(&sp);
	sp.temperature = 0;
	const int want = 40;
	uint64_t drafted = 0, accepted = 0;
	for (int s = 0; s < v.ref.n_seqs; s++) {
		const fx_seq *q = &v.ref.seqs[s];
		if (q->n < 7)
			continue;
		gen plain;
		gen_init(&v, &plain, &sp, 0);
		run_together(&v, &plain, 1, q->ids, 6, want);
		/* alone at depth 1 and 2, then three together with depths 0, 1, 2 */
		for (int depth = 1; depth <= 2; depth++) {
			gen g;
			gen_init(&v, &g, &sp, depth);
			run_together(&v, &g, 1, q->ids, 6, want);
			assert_memory_equal(g.out, plain.out, sizeof(int32_t) * want);
			/* rollback: the cache holds exactly prompt + emitted - 1 positions */
			assert_true(ds_seq_len(g.seq) >= 6 + want - 1);
			drafted += g.r.drafted;
			accepted += g.r.accepted;
			gen_free(&g);
		}
		gen trio[3];
		for (int i = 0; i < 3; i++)
			gen_init(&v, &trio[i], &sp, i);
		run_together(&v, trio, 3, q->ids, 6, want);
		for (int i = 0; i < 3; i++) {
			assert_memory_equal(trio[i].out, plain.out, sizeof(int32_t) * want);
			gen_free(&trio[i]);
		}
		gen_free(&plain);
	}
	assert_true(drafted > 0);
	print_message("%s: greedy identical; drafts accepted %llu of %llu\n", name, (unsigned long long)accepted,
		      (unsigned long long)drafted);
	assert_int_equal(ds_kv_pool_free_count(ds_engine_pool(v.eng)), ds_kv_pool_blocks(ds_engine_pool(v.eng)));
	env_close(&v);
}

static void test_greedy_v3(void **st) { (void)st; greedy_identical("v3"); }
static void test_greedy_fp8(void **st) { (void)st; greedy_identical("fp8"); }

/* After a run that rejected drafts, truncating the sequence to the emitted
 * length and re-decoding gives the logits of a fresh plain run: the cache
 * holds nothing of the rejected drafts. */
static void test_rollback_cache(void **st)
{
	(void)st;
	env v;
	env_open(&v, "v3", 2);
	ds_sampling sp;
	ds_sampling_default(&sp);
	sp.temperature = 0;
	const fx_seq *q = &v.ref.seqs[v.ref.n_seqs - 1];
	gen g, p;
	gen_init(&v, &g, &sp, 2);
	gen_init(&v, &p, &sp, 0);
	run_together(&v, &g, 1, q->ids, 6, 30);
	run_together(&v, &p, 1, q->ids, 6, 30);
	assert_true(g.r.drafted > g.r.accepted); /* some drafts were rolled back */
	int len = 6 + 29;
	assert_int_equal(ds_seq_truncate(g.seq, len), 0);
	assert_int_equal(ds_seq_truncate(p.seq, len), 0);
	const int V = v.m->cfg.vocab_size;
	float *a = malloc(sizeof(float) * V), *b = malloc(sizeof(float) * V);
	ds_step_item ia = { .seq = g.seq, .tokens = &g.out[29], .n = 1, .logits = DS_LOGITS_LAST };
	ds_step_item ib = { .seq = p.seq, .tokens = &p.out[29], .n = 1, .logits = DS_LOGITS_LAST };
	assert_int_equal(ds_engine_step(v.eng, &ia, 1, a, NULL, NULL), 0);
	assert_int_equal(ds_engine_step(v.eng, &ib, 1, b, NULL, NULL), 0);
	for (int i = 0; i < V; i++)
		assert_true(fabsf(a[i] - b[i]) <= 1e-5f);
	int na, nb;
	ds_seq_blocks(g.seq, &na);
	ds_seq_blocks(p.seq, &nb);
	assert_int_equal(na, nb);
	free(a);
	free(b);
	gen_free(&g);
	gen_free(&p);
	env_close(&v);
}

/* Upper tail of chi-square with df degrees (Wilson-Hilferty). */
static double chi2_sf(double x, int df)
{
	double k = df, z = (pow(x / k, 1.0 / 3) - (1 - 2 / (9 * k))) / sqrt(2 / (9 * k));
	return 0.5 * erfc(z / sqrt(2));
}

/* Sampling with MTP drafts keeps the distribution of plain sampling: the
 * joint histogram of (2nd, 3rd) generated tokens over many seeds, top_k 3,
 * compared by a two-sample chi-square test at alpha = 0.001. */
static void test_sampling_distribution(void **st)
{
	(void)st;
	env v;
	env_open(&v, "v3", 1);
	const int runs = 1500, K = 3;
	const fx_seq *q = &v.ref.seqs[v.ref.n_seqs - 1];
	int *ha = calloc((size_t)v.m->cfg.vocab_size * 4, sizeof(int));
	int *hb = calloc((size_t)v.m->cfg.vocab_size * 4, sizeof(int));
	int32_t *keys = calloc(4096, sizeof(int32_t));
	int nkeys = 0;
	int ca[4096] = { 0 }, cb[4096] = { 0 };
	uint64_t drafted = 0, accepted = 0;
	for (int depth = 0; depth <= 1; depth++) {
		int *c = depth ? cb : ca;
		for (int r = 0; r < runs; r++) {
			ds_sampling sp;
			ds_sampling_default(&sp);
			sp.top_k = K;
			sp.seed = (uint64_t)r * 7919 + (uint64_t)depth * 1000003;
			gen g;
			gen_init(&v, &g, &sp, depth);
			run_together(&v, &g, 1, q->ids, 4, 3);
			int32_t key = g.out[1] * 100003 + g.out[2];
			int k = 0;
			while (k < nkeys && keys[k] != key)
				k++;
			if (k == nkeys)
				keys[nkeys++] = key;
			c[k]++;
			drafted += g.r.drafted;
			accepted += g.r.accepted;
			gen_free(&g);
		}
	}
	/* pool sparse categories into one so expected counts stay >= 5 */
	double chi = 0, pa = 0, pb = 0;
	int df = -1;
	for (int k = 0; k < nkeys; k++) {
		if (ca[k] + cb[k] < 10) {
			pa += ca[k];
			pb += cb[k];
			continue;
		}
		chi += (double)(ca[k] - cb[k]) * (ca[k] - cb[k]) / (ca[k] + cb[k]);
		df++;
	}
	if (pa + pb > 0) {
		chi += (pa - pb) * (pa - pb) / (pa + pb);
		df++;
	}
	double p = chi2_sf(chi, df > 0 ? df : 1);
	print_message("sampling with MTP: %d categories, chi2 %.1f, df %d, p %.3g; accepted %llu of %llu drafts\n",
		      nkeys, chi, df, p, (unsigned long long)accepted, (unsigned long long)drafted);
	assert_true(df >= 3);
	assert_true(drafted > 0 && accepted > 0 && accepted < drafted);
	assert_true(p > 0.001);
	free(ha);
	free(hb);
	free(keys);
	env_close(&v);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_greedy_v3),
		cmocka_unit_test(test_greedy_fp8),
		cmocka_unit_test(test_rollback_cache),
		cmocka_unit_test(test_sampling_distribution),
	};
	return cmocka_run_group_tests_name("spec", tests, NULL, NULL);
}

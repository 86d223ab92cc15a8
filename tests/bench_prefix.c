/* bench_prefix — what the prefix cache saves on the CPU engine, through the
 * KV manager (cache/kvm.c) as the daemon drives it:
 *  1. time to first token of a request sharing a PREFIX-token prefix
 *     (default 2000) with an earlier one, cache off and on;
 *  2. 64 requests sharing one system prompt, submitted at once: wall time,
 *     generated tokens/s, mean TTFT and hit rate, cache off and on.
 * Greedy decoding; medians of several runs. A model whose context is shorter
 * than the prefix gets it raised in memory (timing only: positions past the
 * trained context are computed the same way, their quality is not measured).
 * Usage: bench_prefix DIR... (env DS_BENCH_THREADS, DS_BENCH_PREFIX, DS_BENCH_RUNS) */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cache/kvm.h"
#include "model/engine.h"
#include "tests/bench_util.h"

/* Process CPU time: on a shared machine wall time swings with other load;
 * with one thread (DS_BENCH_THREADS=1) CPU time is the work done. */
static double cpu(void)
{
	struct timespec t;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

static int32_t argmax(const float *x, int n)
{
	int b = 0;
	for (int i = 1; i < n; i++)
		if (x[i] > x[b])
			b = i;
	return b;
}

static void fill(int32_t *t, int n, unsigned seed, int V)
{
	for (int i = 0; i < n; i++) {
		seed = seed * 1103515245u + 12345u;
		t[i] = (int32_t)((seed >> 8) % (unsigned)(V - 2)) + 2;
	}
}

typedef struct {
	ds_kvm_req r;
	int max_new, n_out;
	double t_add, t_first, c_add, c_first;
} breq;

/* Steps until every request has max_new tokens; returns 0 or -1. */
static int drain(ds_kvm *k, breq **q, int n, float *lg, int V)
{
	int left = n;
	while (left > 0) {
		ds_kvm_req **ready, **failed;
		int n_failed;
		ds_err e = { { 0 } };
		int nr = ds_kvm_step(k, lg, &ready, &failed, &n_failed, &e);
		if (nr < 0 || n_failed) {
			fprintf(stderr, "step: %s (%d failed)\n", e.msg, n_failed);
			return -1;
		}
		double t = now(), c = cpu();
		for (int i = 0; i < nr; i++) {
			breq *b = (breq *)ready[i];
			if (b->n_out++ == 0) {
				b->t_first = t;
				b->c_first = c;
			}
			ds_kvm_push(&b->r, argmax(lg + (size_t)i * V, V));
			if (b->n_out == b->max_new) {
				ds_kvm_remove(k, &b->r);
				left--;
			}
		}
	}
	(void)q;
	return 0;
}

static int bench_model(const char *dir, int threads, int prefix, int runs)
{
	ds_model *m;
	ds_engine *eng;
	ds_err e = { { 0 } };
	if (ds_model_open(dir, 0, &m, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		return -1;
	}
	const int V = m->cfg.vocab_size;
	int raised = 0;
	if (m->cfg.max_position_embeddings < prefix + 64) {
		raised = m->cfg.max_position_embeddings;
		m->cfg.max_position_embeddings = prefix + 256;
	}
	ds_engine_config c;
	ds_engine_config_default(&c);
	c.threads = threads;
	c.kv_bytes = (size_t)1 << 30;
	if (ds_engine_create(m, &c, &eng, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		ds_model_free(m);
		return -1;
	}
	enum { MAXR = 16, NW = 64, SYS = 512, USER = 48, NEW = 32 };
	float *lg = malloc(sizeof(float) * (size_t)V * MAXR);
	int32_t *tok = malloc(sizeof(int32_t) * (size_t)(prefix + SYS + 64));
	printf("%s: %d threads, block %d tokens, %d KV blocks%s\n", dir, threads, ds_kv_pool_block_tokens(ds_engine_pool(eng)),
	       ds_kv_pool_blocks(ds_engine_pool(eng)), raised ? " (context raised for timing)" : "");

	/* 1. TTFT with a shared prefix */
	for (int cache = 0; cache <= 1; cache++) {
		double *ttft = calloc((size_t)runs, sizeof(double)), *cold = calloc((size_t)runs, sizeof(double));
		double *cttft = calloc((size_t)runs, sizeof(double)), *ccold = calloc((size_t)runs, sizeof(double));
		int hit = 0;
		for (int run = 0; run < runs; run++) {
			ds_kvm *k;
			ds_kvm_config kc = { .prefix_cache = cache, .step_tokens = 512, .max_running = MAXR };
			if (ds_kvm_new(eng, &kc, &k))
				return -1;
			breq a = { .max_new = 1 }, b = { .max_new = 1 };
			fill(tok, prefix + 16, 777, V);
			ds_kvm_req_init(&a.r, 1, 0, tok, prefix + 16);
			fill(tok + prefix, 16, 999, V);
			ds_kvm_req_init(&b.r, 1, 0, tok, prefix + 16);
			breq *pa = &a, *pb = &b;
			a.t_add = now();
			a.c_add = cpu();
			ds_kvm_add(k, &a.r);
			if (drain(k, &pa, 1, lg, V))
				return -1;
			b.t_add = now();
			b.c_add = cpu();
			ds_kvm_add(k, &b.r);
			if (drain(k, &pb, 1, lg, V))
				return -1;
			cold[run] = a.t_first - a.t_add;
			ttft[run] = b.t_first - b.t_add;
			ccold[run] = a.c_first - a.c_add;
			cttft[run] = b.c_first - b.c_add;
			hit = b.r.hit_tokens;
			ds_kvm_req_clear(&a.r);
			ds_kvm_req_clear(&b.r);
			ds_kvm_free(k);
		}
		printf("  TTFT, %d-token shared prefix + 16, cache %-3s: second request %8.2f ms wall, %8.2f ms CPU "
		       "(first request %8.2f ms wall, %8.2f ms CPU), %d tokens from cache\n",
		       prefix, cache ? "on" : "off", 1e3 * median(ttft, runs), 1e3 * median(cttft, runs),
		       1e3 * median(cold, runs), 1e3 * median(ccold, runs), hit);
		free(ttft);
		free(cold);
		free(cttft);
		free(ccold);
	}

	/* 2. 64 requests, one system prompt */
	int32_t *sys = malloc(sizeof(int32_t) * SYS);
	fill(sys, SYS, 4242, V);
	for (int cache = 0; cache <= 1; cache++) {
		double *wall = calloc((size_t)runs, sizeof(double)), *mt = calloc((size_t)runs, sizeof(double));
		double *cw = calloc((size_t)runs, sizeof(double));
		ds_kvm_stats st = { 0 };
		for (int run = 0; run < runs; run++) {
			ds_kvm *k;
			ds_kvm_config kc = { .prefix_cache = cache, .step_tokens = 512, .max_running = MAXR };
			if (ds_kvm_new(eng, &kc, &k))
				return -1;
			breq *q = calloc(NW, sizeof(*q));
			breq **pq = calloc(NW, sizeof(*pq));
			double t0 = now(), c0 = cpu();
			for (int i = 0; i < NW; i++) {
				memcpy(tok, sys, sizeof(int32_t) * SYS);
				fill(tok + SYS, USER, 100u + (unsigned)i, V);
				ds_kvm_req_init(&q[i].r, (uint32_t)(i % 4), 0, tok, SYS + USER);
				q[i].max_new = NEW;
				q[i].t_add = t0;
				pq[i] = &q[i];
				ds_kvm_add(k, &q[i].r);
			}
			if (drain(k, pq, NW, lg, V))
				return -1;
			wall[run] = now() - t0;
			cw[run] = cpu() - c0;
			double s = 0;
			for (int i = 0; i < NW; i++)
				s += q[i].t_first - q[i].t_add;
			mt[run] = s / NW;
			ds_kvm_stats_get(k, &st);
			for (int i = 0; i < NW; i++)
				ds_kvm_req_clear(&q[i].r);
			free(q);
			free(pq);
			ds_kvm_free(k);
		}
		double hr = st.prefix.prompt_tokens ? (double)st.prefix.hit_tokens / (double)st.prefix.prompt_tokens : 0;
		double w = median(wall, runs), cs = median(cw, runs);
		printf("  64 requests, %d-token system prompt + %d, %d new each, cache %-3s: %7.3f s wall (%7.1f generated tok/s), "
		       "%7.3f s CPU (%7.1f tok/s), mean TTFT %8.2f ms wall, hit rate %.3f (%llu of %llu prompt tokens)\n",
		       SYS, USER, NEW, cache ? "on" : "off", w, NW * NEW / w, cs, NW * NEW / cs, 1e3 * median(mt, runs), hr,
		       (unsigned long long)st.prefix.hit_tokens, (unsigned long long)st.prefix.prompt_tokens);
		free(wall);
		free(cw);
		free(mt);
	}
	free(sys);
	free(tok);
	free(lg);
	ds_engine_free(eng);
	ds_model_free(m);
	return 0;
}

int main(int argc, char **argv)
{
	int threads = getenv("DS_BENCH_THREADS") ? atoi(getenv("DS_BENCH_THREADS")) : omp_get_num_procs();
	int prefix = getenv("DS_BENCH_PREFIX") ? atoi(getenv("DS_BENCH_PREFIX")) : 2000;
	int runs = getenv("DS_BENCH_RUNS") ? atoi(getenv("DS_BENCH_RUNS")) : 5;
	if (argc < 2 || prefix < 16 || runs < 1) {
		fprintf(stderr, "usage: bench_prefix MODEL_DIR...\n");
		return 2;
	}
	int rc = 0;
	for (int a = 1; a < argc; a++)
		rc |= bench_model(argv[a], threads, prefix, runs) != 0;
	return rc;
}

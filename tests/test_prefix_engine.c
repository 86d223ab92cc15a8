/* The KV manager (prefix cache + scheduler) on the real CPU engine with the
 * v3 fixture. Reference: each request run alone with plain engine steps
 * (whole prompt, then one token at a time), greedy. The same requests
 * through ds_kvm — prefix cache off and on, roomy pool and a pool so small
 * that sequences are preempted and recomputed, prompts in chunks — must give
 * exactly the reference tokens. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cache/kvm.h"
#include "model/engine.h"
#include "tests/fixture_util.h"

#define NREQ 10
#define MAXNEW 40
#define BT 16

typedef struct {
	int32_t prompt[512];
	int n;
	int uid, max_new;
	int32_t out[64];
	int n_out;
} job;

static ds_model *model;
static fx_ref ref;
static int V;

static int setup(void **st)
{
	(void)st;
	if (fx_load("v3", &ref))
		return -1;
	ds_err e = { { 0 } };
	if (ds_model_open(ref.dir, 0, &model, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		return -1;
	}
	V = model->cfg.vocab_size;
	return 0;
}

static int teardown(void **st)
{
	(void)st;
	ds_model_free(model);
	fx_free(&ref);
	return 0;
}

static ds_engine *engine(int kv_blocks)
{
	ds_engine_config c;
	ds_engine_config_default(&c);
	c.threads = 2;
	c.block_tokens = BT;
	c.kv_blocks = kv_blocks;
	ds_engine *eng;
	ds_err e = { { 0 } };
	if (ds_engine_create(model, &c, &eng, &e))
		fail_msg("%s", e.msg);
	return eng;
}

static int32_t argmax(const float *x)
{
	int b = 0;
	for (int i = 1; i < V; i++)
		if (x[i] > x[b])
			b = i;
	return b;
}

/* A system prompt of 5 blocks shared by half the requests, a 1-block one by
 * the others, then each request's own tokens. */
static void make_jobs(job *j)
{
	uint32_t x = 12345;
	for (int i = 0; i < NREQ; i++) {
		int shared = i % 2 ? 80 : 16;
		j[i].n = shared + 5 + (int)((uint32_t)i * 7u % 36u);
		for (int t = 0; t < j[i].n; t++) {
			x = x * 1103515245u + 12345u;
			j[i].prompt[t] = t < shared ? (int32_t)((t * 37 + (i % 2) * 11) % (V - 2)) + 2
						    : (int32_t)((x >> 8) % (uint32_t)(V - 2)) + 2;
		}
		j[i].uid = i % 3;
		j[i].max_new = MAXNEW;
		j[i].n_out = 0;
	}
}

/* The second turn of job 0's chat: its prompt, its reply, new tokens. */
static void second_turn(const job *first, job *j)
{
	memcpy(j->prompt, first->prompt, sizeof(int32_t) * (size_t)first->n);
	memcpy(j->prompt + first->n, first->out, sizeof(int32_t) * (size_t)first->n_out);
	j->n = first->n + first->n_out;
	for (int t = 0; t < 9; t++)
		j->prompt[j->n++] = 3 + t * 5;
	j->uid = 1;
	j->max_new = MAXNEW;
	j->n_out = 0;
}

static void run_alone(job *j)
{
	ds_engine *eng = engine(64);
	float *lg = malloc(sizeof(float) * (size_t)V);
	ds_seq *s;
	assert_int_equal(ds_seq_new(eng, &s), 0);
	ds_step_item it = { .seq = s, .tokens = j->prompt, .n = j->n, .logits = DS_LOGITS_LAST };
	ds_err e = { { 0 } };
	for (j->n_out = 0; j->n_out < j->max_new;) {
		if (ds_engine_step(eng, &it, 1, lg, NULL, &e))
			fail_msg("%s", e.msg);
		j->out[j->n_out] = argmax(lg);
		it.tokens = &j->out[j->n_out++];
		it.n = 1;
	}
	ds_seq_free(s);
	free(lg);
	ds_engine_free(eng);
}

typedef struct {
	int preemptions, steps, max_tokens;
	uint64_t hit_tokens, prompt_tokens;
} run_info;

/* Runs jobs through ds_kvm; job NREQ (the second turn of job 0) is queued
 * when job 0 finishes. */
static run_info run_kvm(job *jobs, int kv_blocks, int prefix, int step_tokens)
{
	ds_engine *eng = engine(kv_blocks);
	ds_kvm *k;
	ds_kvm_config c = { .prefix_cache = prefix, .step_tokens = step_tokens, .max_running = 4 };
	assert_int_equal(ds_kvm_new(eng, &c, &k), 0);
	ds_kvm_req *r = calloc(NREQ + 1, sizeof(*r));
	int *done = calloc(NREQ + 1, sizeof(int));
	float *lg = malloc(sizeof(float) * (size_t)V * 4);
	for (int i = 0; i < NREQ; i++) {
		jobs[i].n_out = 0;
		assert_int_equal(ds_kvm_req_init(&r[i], (uint32_t)jobs[i].uid, 0, jobs[i].prompt, jobs[i].n), 0);
		r[i].user = &jobs[i];
		assert_int_equal(ds_kvm_add(k, &r[i]), 0);
	}
	run_info info = { 0 };
	int left = NREQ + 1;
	while (left > 0) {
		ds_kvm_req **ready, **failed;
		int n_failed;
		ds_err e = { { 0 } };
		int n = ds_kvm_step(k, lg, &ready, &failed, &n_failed, &e);
		if (n < 0)
			fail_msg("step: %s", e.msg);
		assert_int_equal(n_failed, 0);
		assert_true(n > 0 || info.steps > 0);
		info.steps++;
		for (int i = 0; i < n; i++) {
			job *j = ready[i]->user;
			int32_t t = argmax(lg + (size_t)i * V);
			j->out[j->n_out++] = t;
			assert_int_equal(ds_kvm_push(ready[i], t), 0);
			if (j->n_out == j->max_new) {
				int idx = (int)(ready[i] - r);
				ds_kvm_remove(k, ready[i]);
				done[idx] = 1;
				left--;
				if (idx == 0) {
					second_turn(&jobs[0], &jobs[NREQ]);
					assert_int_equal(ds_kvm_req_init(&r[NREQ], 1, 0, jobs[NREQ].prompt, jobs[NREQ].n), 0);
					r[NREQ].user = &jobs[NREQ];
					assert_int_equal(ds_kvm_add(k, &r[NREQ]), 0);
				}
			}
		}
		assert_true(info.steps < 2000);
	}
	ds_kvm_stats st;
	ds_kvm_stats_get(k, &st);
	info.preemptions = (int)st.sched.preempted;
	info.hit_tokens = st.prefix.hit_tokens;
	info.prompt_tokens = st.prefix.prompt_tokens;
	assert_int_equal(st.prefix.blocks_used, 0);
	assert_int_equal(st.sched.running + st.sched.waiting, 0);
	if (prefix)
		assert_int_equal(st.prefix.blocks_free + st.prefix.blocks_cached, st.prefix.blocks_total);
	/* in a roomy pool, the second turn finds job 0's prompt and reply */
	if (prefix && kv_blocks >= 256)
		assert_true(r[NREQ].hit_tokens >= (jobs[0].n + MAXNEW) / BT * BT - BT);
	for (int i = 0; i <= NREQ; i++)
		ds_kvm_req_clear(&r[i]);
	ds_kvm_free(k);
	assert_int_equal(ds_kv_pool_free_count(ds_engine_pool(eng)), ds_kv_pool_blocks(ds_engine_pool(eng)));
	ds_engine_free(eng);
	free(r);
	free(done);
	free(lg);
	return info;
}

static void expect_same(const job *a, const job *b, const char *what)
{
	for (int i = 0; i <= NREQ; i++) {
		assert_int_equal(a[i].n_out, b[i].n_out);
		for (int t = 0; t < a[i].n_out; t++)
			if (a[i].out[t] != b[i].out[t])
				fail_msg("%s: request %d token %d: %d, alone %d", what, i, t, b[i].out[t], a[i].out[t]);
	}
}

static job ref_jobs[NREQ + 1];

static void reference(void)
{
	static int made;
	if (made)
		return;
	make_jobs(ref_jobs);
	for (int i = 0; i < NREQ; i++)
		run_alone(&ref_jobs[i]);
	second_turn(&ref_jobs[0], &ref_jobs[NREQ]);
	run_alone(&ref_jobs[NREQ]);
	made = 1;
}

static void test_cache_on_off_same_tokens(void **st)
{
	(void)st;
	reference();
	job off[NREQ + 1], on[NREQ + 1];
	make_jobs(off);
	make_jobs(on);
	run_info a = run_kvm(off, 256, 0, 48);
	run_info b = run_kvm(on, 256, 1, 48);
	expect_same(ref_jobs, off, "cache off");
	expect_same(ref_jobs, on, "cache on");
	assert_int_equal(a.preemptions + b.preemptions, 0);
	assert_int_equal(a.hit_tokens, 0);
	/* 4 of the 5 shared-80 prompts reuse 5 blocks, 4 of the 5 shared-16 ones
	 * 1 block, plus the second turn */
	if (b.hit_tokens < 4 * 80 + 4 * 16)
		fail_msg("only %llu prompt tokens came from the cache", (unsigned long long)b.hit_tokens);
	assert_true(b.steps <= a.steps);
}

static void test_tiny_pool_preempts_same_tokens(void **st)
{
	(void)st;
	reference();
	/* the largest sequence (120 + 40 tokens) needs 10 blocks of 16 */
	for (int prefix = 0; prefix <= 1; prefix++) {
		job tiny[NREQ + 1];
		make_jobs(tiny);
		run_info a = run_kvm(tiny, 12, prefix, 32);
		expect_same(ref_jobs, tiny, prefix ? "tiny pool, cache on" : "tiny pool, cache off");
		if (a.preemptions < 5)
			fail_msg("prefix %d: the tiny pool preempted only %d times", prefix, a.preemptions);
		print_message("prefix cache %s: %d preemptions in %d steps\n", prefix ? "on" : "off", a.preemptions, a.steps);
	}
}

static void test_refusals(void **st)
{
	(void)st;
	ds_engine *eng = engine(8);
	ds_kvm *k;
	ds_kvm_config c = { .prefix_cache = 1 };
	assert_int_equal(ds_kvm_new(eng, &c, &k), 0);
	static int32_t toks[600];
	ds_kvm_req r;
	assert_int_equal(ds_kvm_req_init(&r, 0, 0, toks, 513), 0);
	assert_int_equal(ds_kvm_add(k, &r), -E2BIG); /* the fixture's context is 512 */
	ds_kvm_req_clear(&r);
	assert_int_equal(ds_kvm_req_init(&r, 0, 0, toks, 129), 0);
	assert_int_equal(ds_kvm_add(k, &r), -ENOSPC); /* 9 blocks of 16 > 8 */
	ds_kvm_req_clear(&r);
	ds_kvm_free(k);
	ds_engine_free(eng);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_cache_on_off_same_tokens),
		cmocka_unit_test(test_tiny_pool_preempts_same_tokens),
		cmocka_unit_test(test_refusals),
	};
	return cmocka_run_group_tests_name("prefix_engine", tests, setup, teardown);
}

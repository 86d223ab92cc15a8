/* Scheduling policy against a simulated engine: the real KV pool and prefix
 * cache, sequences that allocate one block per block_tokens positions as
 * ds_engine_step does, and a "model" whose next token is a hash of the whole
 * history, so a stream that lost, repeated or reordered a token after a
 * preemption differs from the unconstrained reference. */
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
#include "cache/sched.h"

#define MAXT 1400
#define MAXB 400
#define VOCAB 1000

typedef struct req {
	ds_sched_req r;
	int32_t tok[MAXT];
	int n_prompt, max_new, generated;
	int32_t blocks[MAXB];
	int nb;
	int was_running, done, cancelled, error;
	int hit_tokens;
} req;

typedef struct world {
	ds_kv_pool *pool;
	ds_prefix *pc;
	ds_sched *s;
	ds_sched_config cfg;
	int bt;
	int steps, preemptions;
	uint32_t admit_uid[4096];
	unsigned char admit_eligible2[4096]; /* client 2 was waiting and under its limit */
	int n_log;
	req **all;
	int n_all;
} world;

static int32_t model_next(const int32_t *t, int n)
{
	uint64_t h = 1469598103934665603ull;
	for (int i = 0; i < n; i++) {
		h ^= (uint32_t)t[i];
		h *= 1099511628211ull;
	}
	return (int32_t)(h % VOCAB);
}

static int op_available(void *ctx)
{
	world *w = ctx;
	return ds_kv_pool_free_count(w->pool) + ds_prefix_cached(w->pc);
}

static int op_admit(void *ctx, ds_sched_req *sr)
{
	world *w = ctx;
	req *q = (req *)sr;
	assert_int_equal(q->nb, 0);
	if (!w->pc)
		return 0;
	int hit = ds_prefix_lookup(w->pc, q->tok, q->r.n_tokens, q->blocks, MAXB);
	assert_true(hit >= 0);
	for (int i = 0; i < hit / w->bt; i++)
		ds_kv_pool_ref(w->pool, q->blocks[i]);
	q->nb = hit / w->bt;
	q->hit_tokens = hit;
	return hit;
}

static void op_release(void *ctx, ds_sched_req *sr)
{
	world *w = ctx;
	req *q = (req *)sr;
	for (int i = 0; i < q->nb; i++)
		ds_kv_pool_unref(w->pool, q->blocks[i]);
	q->nb = 0;
}

static void w_open(world *w, int pool_blocks, int bt, int step_tokens, int max_running, int uid_limit, int prefix)
{
	memset(w, 0, sizeof(*w));
	w->bt = bt;
	assert_int_equal(ds_kv_pool_new(pool_blocks, bt, &w->pool), 0);
	if (prefix)
		assert_int_equal(ds_prefix_new(w->pool, &w->pc), 0);
	w->cfg = (ds_sched_config){ .block_tokens = bt, .pool_blocks = pool_blocks, .max_context = MAXT - 1,
				    .step_tokens = step_tokens, .max_running = max_running,
				    .uid_max_running = uid_limit };
	ds_sched_ops ops = { .ctx = w, .available = op_available, .admit = op_admit, .release = op_release };
	assert_int_equal(ds_sched_new(&w->cfg, &ops, &w->s), 0);
	w->all = calloc(4096, sizeof(req *));
}

static void w_close(world *w)
{
	for (int i = 0; i < w->n_all; i++) {
		if (w->all[i]->r.state != DS_SCHED_IDLE) {
			ds_sched_remove(w->s, &w->all[i]->r);
			op_release(w, &w->all[i]->r);
		}
		free(w->all[i]);
	}
	free(w->all);
	w->s = ds_sched_free(w->s);
	w->pc = ds_prefix_free(w->pc);
	assert_int_equal(ds_kv_pool_free_count(w->pool), ds_kv_pool_blocks(w->pool));
	ds_kv_pool_free(w->pool);
}

static req *submit(world *w, uint32_t uid, int prio, const int32_t *prompt, int n, int max_new)
{
	req *q = calloc(1, sizeof(*q));
	memcpy(q->tok, prompt, sizeof(int32_t) * (size_t)n);
	q->n_prompt = n;
	q->max_new = max_new;
	q->r.uid = uid;
	q->r.priority = prio;
	q->r.n_tokens = n;
	int rc = ds_sched_add(w->s, &q->r);
	if (rc) {
		q->error = rc;
		q->done = 1;
	}
	w->all[w->n_all++] = q;
	return q;
}

static int used_blocks(const world *w)
{
	int used = 0;
	for (int b = 0; b < ds_kv_pool_blocks(w->pool); b++)
		used += ds_kv_pool_refcount(w->pool, b) > 0;
	return used;
}

/* One step: plan, check the plan's promises, run it like the engine would. */
static ds_sched_plan step(world *w)
{
	ds_sched_plan p;
	assert_true(ds_sched_plan_step(w->s, &p) >= 0);
	w->steps++;
	w->preemptions += p.n_preempted;
	assert_true(p.tokens <= w->cfg.step_tokens);
	assert_true(p.n_items <= w->cfg.max_running);
	int sum = 0, run2 = 0, wait2 = 0;
	for (int i = 0; i < w->n_all; i++)
		if (w->all[i]->r.uid == 2 && !w->all[i]->done && !w->all[i]->cancelled) {
			run2 += w->all[i]->was_running;
			wait2 += !w->all[i]->was_running;
		}
	for (int i = 0; i < p.n_items; i++) {
		req *q = (req *)p.items[i];
		assert_int_equal(q->r.state, DS_SCHED_RUNNING);
		assert_true(q->r.n_sched >= 1 && q->r.n_cached + q->r.n_sched <= q->r.n_tokens);
		assert_int_equal(q->nb, (q->r.n_cached + w->bt - 1) / w->bt);
		sum += q->r.n_sched;
		if (!q->was_running && w->n_log < 4096) {
			w->admit_eligible2[w->n_log] = wait2 > 0 && (!w->cfg.uid_max_running || run2 < w->cfg.uid_max_running);
			w->admit_uid[w->n_log++] = q->r.uid;
			if (q->r.uid == 2) {
				run2++;
				wait2--;
			}
		}
	}
	assert_int_equal(sum, p.tokens);
	if (w->cfg.uid_max_running) {
		for (int i = 0; i < w->n_all; i++) {
			int n = 0;
			for (int j = 0; j < w->n_all; j++)
				n += w->all[j]->r.state == DS_SCHED_RUNNING && w->all[j]->r.uid == w->all[i]->r.uid;
			assert_true(n <= w->cfg.uid_max_running);
		}
	}
	for (int i = 0; i < p.n_failed; i++) {
		req *q = (req *)p.failed[i];
		assert_int_equal(q->nb, 0);
		q->error = q->r.error;
		q->done = 1;
	}
	/* allocate first, for every item: the plan promised the blocks */
	for (int i = 0; i < p.n_items; i++) {
		req *q = (req *)p.items[i];
		int need = (q->r.n_cached + q->r.n_sched + w->bt - 1) / w->bt;
		while (q->nb < need) {
			int32_t b = ds_kv_pool_alloc(w->pool);
			if (b < 0)
				fail_msg("step %d: the plan's blocks were not there", w->steps);
			q->blocks[q->nb++] = b;
		}
	}
	for (int i = 0; i < p.n_items; i++) {
		req *q = (req *)p.items[i];
		q->r.n_cached += q->r.n_sched;
		if (q->r.n_cached == q->r.n_tokens) {
			q->tok[q->r.n_tokens] = model_next(q->tok, q->r.n_tokens);
			q->r.n_tokens++;
			q->generated++;
		}
		if (w->pc)
			ds_prefix_insert(w->pc, q->tok, q->r.n_cached, q->blocks, q->nb);
		if (q->generated == q->max_new) {
			ds_sched_remove(w->s, &q->r);
			op_release(w, &q->r);
			q->done = 1;
		}
	}
	for (int i = 0; i < w->n_all; i++)
		w->all[i]->was_running = w->all[i]->r.state == DS_SCHED_RUNNING;
	if (w->pc)
		assert_int_equal(ds_prefix_check(w->pc), 0);
	return p;
}

static int run_all(world *w, int max_steps)
{
	for (int k = 0; k < max_steps; k++) {
		int busy = 0;
		for (int i = 0; i < w->n_all; i++)
			busy |= !w->all[i]->done && !w->all[i]->cancelled;
		if (!busy)
			return k;
		step(w);
	}
	fail_msg("requests still unfinished after %d steps", max_steps);
	return -1;
}

static void check_stream(const req *q)
{
	int32_t t[MAXT];
	memcpy(t, q->tok, sizeof(int32_t) * (size_t)q->n_prompt);
	for (int i = 0; i < q->generated; i++) {
		t[q->n_prompt + i] = model_next(t, q->n_prompt + i);
		if (t[q->n_prompt + i] != q->tok[q->n_prompt + i])
			fail_msg("token %d of the stream differs", i);
	}
}

static void make_prompt(int32_t *t, int n, unsigned seed, int shared)
{
	for (int i = 0; i < n; i++)
		t[i] = i < shared ? (int32_t)((i * 7919) % VOCAB) : (int32_t)((seed * 31u + (unsigned)i * 17u) % VOCAB);
}

static void test_refuse(void **st)
{
	(void)st;
	world w;
	w_open(&w, 10, 16, 64, 4, 0, 1);
	int32_t t[MAXT] = { 0 };
	assert_int_equal(submit(&w, 1, 0, t, MAXT - 1, 1)->error, -ENOSPC); /* 87 blocks > pool of 10 */
	req *q = calloc(1, sizeof(*q));
	q->r.n_tokens = MAXT;
	assert_int_equal(ds_sched_add(w.s, &q->r), -E2BIG);
	q->r.n_tokens = 0;
	assert_int_equal(ds_sched_add(w.s, &q->r), -EINVAL);
	q->r.n_tokens = 161; /* 11 blocks */
	assert_int_equal(ds_sched_add(w.s, &q->r), -ENOSPC);
	q->r.n_tokens = 160;
	assert_int_equal(ds_sched_add(w.s, &q->r), 0);
	assert_int_equal(ds_sched_add(w.s, &q->r), -EINVAL); /* already queued */
	ds_sched_remove(w.s, &q->r);
	free(q);
	ds_sched_config bad = w.cfg;
	bad.step_tokens = 2; /* fewer than max_running: decodes could starve */
	ds_sched_ops ops = { .ctx = &w, .available = op_available, .admit = op_admit, .release = op_release };
	ds_sched *s2 = NULL;
	assert_int_equal(ds_sched_new(&bad, &ops, &s2), -EINVAL);
	ds_sched_stats ss;
	ds_sched_stats_get(w.s, &ss);
	assert_int_equal(ss.running + ss.waiting + ss.clients, 0);
	w_close(&w);
}

/* A long prompt arrives while three requests decode: every step carries all
 * three decodes and a prompt chunk of at most budget - 3 tokens. */
static void test_chunked_prefill(void **st)
{
	(void)st;
	world w;
	w_open(&w, 200, 16, 64, 8, 0, 1);
	int32_t t[MAXT];
	req *d[3];
	for (int i = 0; i < 3; i++) {
		make_prompt(t, 20, 10 + i, 0);
		d[i] = submit(&w, 1, 0, t, 20, 200);
	}
	for (int k = 0; k < 3; k++)
		step(&w);
	make_prompt(t, 1000, 99, 0);
	req *big = submit(&w, 2, 0, t, 1000, 5);
	int chunks = 0;
	while (!big->done) {
		ds_sched_plan p = step(&w);
		int seen = 0;
		for (int i = 0; i < p.n_items; i++) {
			req *q = (req *)p.items[i];
			if (q == big && q->r.n_sched > 1) {
				chunks++;
				assert_true(q->r.n_sched <= 61);
			} else if (q != big) {
				assert_int_equal(q->r.n_sched, 1);
				seen++;
			}
		}
		assert_int_equal(seen, 3);
		assert_true(w.steps < 100);
	}
	assert_int_equal(chunks, (1000 + 60) / 61);
	check_stream(big);
	for (int i = 0; i < 3; i++)
		check_stream(d[i]);
	w_close(&w);
}

/* Client 1 floods; client 2 sends a few requests after it. Bound: while a
 * client has a request waiting and is under its running limit, at most U-1
 * requests of other clients (U = clients waiting) are admitted before it;
 * with two clients, client 2 never waits behind more than one of client 1's
 * admissions. With a limit of 2, client 1 also never holds more than 2. */
static void test_fairness(void **st)
{
	(void)st;
	for (int limit = 0; limit <= 2; limit += 2) {
		world w;
		w_open(&w, 64, 16, 256, 4, limit, 1);
		int32_t t[MAXT];
		for (int i = 0; i < 40; i++) {
			make_prompt(t, 40, (unsigned)i, 0);
			submit(&w, 1, 0, t, 40, 6);
		}
		step(&w);
		step(&w);
		int first_b = w.n_log;
		for (int i = 0; i < 5; i++) {
			make_prompt(t, 40, 1000u + (unsigned)i, 0);
			submit(&w, 2, 0, t, 40, 6);
		}
		run_all(&w, 2000);
		int run_a = 0, b_seen = 0;
		for (int i = first_b; i < w.n_log; i++) {
			if (w.admit_uid[i] == 2) {
				b_seen++;
				run_a = 0;
			} else if (w.admit_eligible2[i]) {
				if (++run_a > 1)
					fail_msg("limit %d: client 2 waited behind %d admissions of client 1", limit, run_a);
			}
		}
		assert_int_equal(b_seen, 5);
		for (int i = 0; i < w.n_all; i++)
			check_stream(w.all[i]);
		w_close(&w);
	}
}

/* Preemption picks the lowest priority, then the client running the most
 * sequences, then the youngest; a high-priority sequence is never the victim
 * while a lower one runs. */
static void test_victim(void **st)
{
	(void)st;
	world w;
	/* 4 requests of 16 tokens each take 1 block + 1 for the first token: a
	 * pool of 7 blocks runs out while they decode. */
	w_open(&w, 7, 16, 64, 8, 0, 0);
	int32_t t[MAXT];
	make_prompt(t, 15, 1, 0);
	req *a1 = submit(&w, 1, 0, t, 15, 40);
	make_prompt(t, 15, 2, 0);
	req *hi = submit(&w, 1, 5, t, 15, 40);
	make_prompt(t, 15, 4, 0);
	req *a2 = submit(&w, 1, 0, t, 15, 40);
	make_prompt(t, 15, 3, 0);
	req *b1 = submit(&w, 2, 0, t, 15, 40); /* the youngest, but its client runs one */
	step(&w); /* all prefilled, first token sampled */
	assert_int_equal(w.preemptions, 0);
	while (w.preemptions == 0)
		step(&w);
	assert_int_equal(a2->r.n_preempted, 1); /* client 1 runs three; a2 is its youngest low */
	assert_int_equal(a1->r.n_preempted + b1->r.n_preempted + hi->r.n_preempted, 0);
	run_all(&w, 1000);
	assert_int_equal(hi->r.n_preempted, 0);
	for (int i = 0; i < w.n_all; i++)
		check_stream(w.all[i]);
	w_close(&w);
}

/* The same workload under a pool that forces preemptions produces exactly
 * the streams of an unconstrained run, with the prefix cache on and off. */
static void workload(world *w, int n, unsigned seed)
{
	int32_t t[MAXT];
	srand(seed);
	for (int i = 0; i < n; i++) {
		int len = 10 + rand() % 90;
		make_prompt(t, len, seed * 100u + (unsigned)i, rand() % 2 ? 48 : 0);
		submit(w, (uint32_t)(1 + i % 3), rand() % 3, t, len, 5 + rand() % 40);
	}
}

static void test_preemption_same_tokens(void **st)
{
	(void)st;
	for (int prefix = 0; prefix <= 1; prefix++) {
		world ref, tiny;
		w_open(&ref, 400, 8, 128, 16, 0, prefix);
		w_open(&tiny, 20, 8, 128, 16, 0, prefix); /* the largest request needs 18 */
		workload(&ref, 24, 7);
		workload(&tiny, 24, 7);
		run_all(&ref, 5000);
		run_all(&tiny, 20000);
		assert_int_equal(ref.preemptions, 0);
		if (tiny.preemptions < 5)
			fail_msg("the tiny pool preempted only %d times", tiny.preemptions);
		for (int i = 0; i < 24; i++) {
			req *a = ref.all[i], *b = tiny.all[i];
			assert_int_equal(a->error, 0);
			assert_int_equal(b->error, 0);
			assert_int_equal(a->generated, a->max_new);
			assert_int_equal(b->generated, b->max_new);
			assert_memory_equal(a->tok, b->tok, sizeof(int32_t) * (size_t)(a->n_prompt + a->generated));
			check_stream(a);
		}
		assert_int_equal(used_blocks(&tiny), 0);
		w_close(&ref);
		w_close(&tiny);
	}
}

/* Random arrivals from three clients with random priorities, random cancels
 * (the caller removes the request and frees its sequence), a small pool,
 * per-client limits: every plan keeps its promises, every finished stream is
 * the model's, and no block stays in use. */
static void test_stress(void **st)
{
	(void)st;
	for (unsigned seed = 1; seed <= 4; seed++) {
		world w;
		w_open(&w, 24, 8, 48, 6, 3, seed % 2);
		srand(seed);
		int32_t t[MAXT];
		for (int k = 0; k < 3000; k++) {
			if (rand() % 4 == 0 && w.n_all < 300) {
				int len = 1 + rand() % 120;
				make_prompt(t, len, (unsigned)rand(), rand() % 3 ? 40 : 0);
				submit(&w, (uint32_t)(rand() % 3), rand() % 4, t, len, 1 + rand() % 30);
			}
			if (rand() % 10 == 0 && w.n_all > 0) {
				req *q = w.all[rand() % w.n_all];
				if (!q->done && !q->cancelled) {
					ds_sched_remove(w.s, &q->r);
					op_release(&w, &q->r);
					q->cancelled = 1;
				}
			}
			step(&w);
		}
		run_all(&w, 20000);
		int finished = 0;
		for (int i = 0; i < w.n_all; i++) {
			req *q = w.all[i];
			if (q->cancelled)
				continue;
			if (q->error)
				assert_int_equal(q->error, -ENOSPC); /* prompt + generation outgrew the pool */
			else
				finished++;
			check_stream(q);
		}
		assert_true(finished > 50);
		assert_int_equal(used_blocks(&w), 0);
		ds_sched_stats ss;
		ds_sched_stats_get(w.s, &ss);
		assert_int_equal(ss.running + ss.waiting, 0);
		w_close(&w);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_refuse),
		cmocka_unit_test(test_chunked_prefill),
		cmocka_unit_test(test_fairness),
		cmocka_unit_test(test_victim),
		cmocka_unit_test(test_preemption_same_tokens),
		cmocka_unit_test(test_stress),
	};
	return cmocka_run_group_tests_name("sched", tests, NULL, NULL);
}

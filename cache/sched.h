/* sched.h — which requests run in the next engine step, and with how many tokens.
 * Decodes first, then prefill chunks under a per-step token budget; admission
 * round-robin across client uids when a prompt's blocks fit; preemption of the
 * lowest-ranked sequence when the pool runs out. The caller (the batcher) owns
 * the requests and their sequences; this only decides. One thread. */
#ifndef DS_SCHED_H
#define DS_SCHED_H

#include <stdint.h>

typedef struct ds_sched ds_sched;

enum { DS_SCHED_IDLE = 0, DS_SCHED_WAITING = 1, DS_SCHED_RUNNING = 2 };

typedef struct ds_sched_req ds_sched_req;
struct ds_sched_req {
	/* The caller sets these before ds_sched_add and keeps them current. */
	uint32_t uid;       /* client (SO_PEERCRED) */
	int priority;       /* larger is admitted first within its client, preempted last */
	int n_tokens;       /* prompt + generated so far */
	int n_cached;       /* positions in the sequence's KV (ds_seq_len); the
			     * scheduler sets it on admission and preemption */
	void *user;
	/* Set by the scheduler. */
	int state;          /* DS_SCHED_* */
	int n_sched;        /* tokens to feed this step, from position n_cached */
	int error;          /* why it was failed (plan->failed) */
	int n_preempted;    /* times it was preempted */
	uint64_t arrival;   /* order of ds_sched_add */
	ds_sched_req *prev, *next; /* its client's waiting queue */
	int n_admits;       /* admissions, including undone ones */
};

typedef struct ds_sched_ops {
	void *ctx;
	/* Blocks an allocation can get now: free plus evictable cached ones. */
	int (*available)(void *ctx);
	/* Creates r's sequence, adopting cached prefix blocks for r's tokens;
	 * returns the positions already cached (< r->n_tokens) or -errno. */
	int (*admit)(void *ctx, ds_sched_req *r);
	/* Frees r's sequence (preemption, or an admission undone because the
	 * prompt did not fit); r keeps its tokens and is recomputed later. */
	void (*release)(void *ctx, ds_sched_req *r);
} ds_sched_ops;

typedef struct ds_sched_config {
	int block_tokens;
	int pool_blocks;
	int max_context;      /* the model's positions */
	int step_tokens;      /* token budget of one step (>= max_running) */
	int max_running;      /* sequences in the engine at once */
	int uid_max_running;  /* per client; 0 = no limit */
} ds_sched_config;

typedef struct ds_sched_plan {
	ds_sched_req **items;  /* run r->n_sched tokens from r->n_cached */
	int n_items;
	ds_sched_req **failed; /* taken out of the scheduler: r->error (-ENOSPC, -E2BIG, admit's error) */
	int n_failed;
	int tokens;            /* sum of n_sched */
	int n_admitted, n_preempted;
} ds_sched_plan;

typedef struct ds_sched_stats {
	int running, waiting, clients;
	uint64_t admitted, preempted, steps;
} ds_sched_stats;

int ds_sched_new(const ds_sched_config *c, const ds_sched_ops *ops, ds_sched **out);
/* Accepts NULL. Requests still queued are forgotten, not released. */
ds_sched *ds_sched_free(ds_sched *s);

/* Queues r (state WAITING). A prompt longer than the context is -E2BIG, one
 * whose blocks exceed the whole pool -ENOSPC: refused at once. */
int ds_sched_add(ds_sched *s, ds_sched_req *r);
/* Forgets r (finished, cancelled, disconnected); the caller frees its sequence. */
void ds_sched_remove(ds_sched *s, ds_sched_req *r);

/* Decides the next step. Calls ops->admit / ops->release for admissions and
 * preemptions as it goes; the blocks the items need are available when it
 * returns. plan's arrays stay valid until the next call. After running the
 * step the caller updates n_cached (and n_tokens when it samples). */
int ds_sched_plan_step(ds_sched *s, ds_sched_plan *plan);
/* Preempts the lowest-ranked running request (an engine step failed with
 * -ENOSPC anyway). Returns 0, or -ENOENT when nothing runs. */
int ds_sched_preempt_one(ds_sched *s);

void ds_sched_stats_get(const ds_sched *s, ds_sched_stats *st);

#endif

/* batcher.h — the engine thread: continuous batching over ds_engine_step.
 * Every step runs all runnable sequences (cache/sched.h decides prefill
 * chunks, admission and preemption); new requests join at the next step,
 * finished ones leave at once. The event loop hands it work through a
 * mutex-protected inbox and gets output back through an outbox and an
 * eventfd; it never waits on the engine. Calls below: loop thread only. */
#ifndef DS_BATCHER_H
#define DS_BATCHER_H

#include "daemon/server.h"
#include "model/err.h"

typedef struct ds_batcher ds_batcher;

typedef struct ds_batcher_cfg {
	int max_batch;          /* sequences in one step */
	int step_tokens;        /* token budget of one step */
	int uid_max_running;    /* 0 = no limit */
	int prefix_cache;       /* 1: share KV of identical prompt prefixes (cache/prefix.h) */
	long sock_budget;       /* socket bytes queued per connection before its streams pause */
	int mtp_depth;          /* drafts per step from the MTP module; 0 = no speculative decoding */
	int mtp_max_batch;      /* draft only while a step runs at most this many sequences */
	int mtp_chain;          /* verify and draft in one engine call: -1 where the engine chains, 0 never, 1 always */
} ds_batcher_cfg;

enum { DS_OUT_BYTES = 1, /* append buf to conn's socket output */
       DS_OUT_DONE = 2,  /* request req_id of conn left the engine */
       DS_OUT_CLOSE = 3  /* close conn (its ring is corrupt) */ };

typedef struct ds_out_msg {
	int kind;
	ds_conn *conn;          /* referenced: the loop drops it */
	uint64_t req_id;
	uint8_t *buf;
	size_t len;
	struct ds_out_msg *next;
} ds_out_msg;

#define DS_STATS_MAX_LAYERS 128

typedef struct ds_batcher_stats {
	uint64_t submitted, completed, cancelled, failed, preempted, steps;
	uint64_t prompt_tokens, generated_tokens;
	int running, waiting, paused, live;
	int kv_blocks_total, kv_blocks_free, block_tokens;
	int kv_blocks_cached;   /* unreferenced, kept by the prefix cache (not in free) */
	uint64_t prefix_prompt_tokens, prefix_hit_tokens, prefix_evictions; /* of finished requests */
	double ttft_p50_ms, ttft_p99_ms, tpot_p50_ms, tpot_p99_ms, tokens_per_s;
	double last_step_ms;
	/* speculative decoding: drafts verified and accepted; decode steps of a
	 * sequence and the tokens they emitted (tokens per step = the ratio) */
	uint64_t mtp_drafted, mtp_accepted, decode_steps, decode_tokens;
	int mtp_depth, mtp_max_batch;
	/* expert load since start, per MoE layer (main and MTP): the busiest
	 * expert's tokens over the mean; refreshed about once a second */
	int expert_layers;                  /* 0: no experts, or not counted */
	uint64_t expert_routed;             /* (token, expert) pairs, all layers */
	double expert_max_over_mean[DS_STATS_MAX_LAYERS];
	int expert_layer_id[DS_STATS_MAX_LAYERS], expert_hottest[DS_STATS_MAX_LAYERS];
	int draining;
} ds_batcher_stats;

typedef struct ds_ps_entry {
	uint64_t id;
	uid_t uid;
	pid_t pid;
	int state;              /* DS_SCHED_* or 3 = paused */
	int prompt_tokens, generated, cached;
	double age_s;
} ds_ps_entry;

/* An idle batcher: its inbox takes requests at once (they wait there while
 * the model loads); out_efd is written when the outbox has messages. */
int ds_batcher_new(int out_efd, ds_batcher **out);
/* Gives it the engine and starts the thread, which takes the inbox in order.
 * On failure b stays idle (ds_batcher_stop frees it and what waits). */
int ds_batcher_start(ds_batcher *b, ds_engine *eng, const ds_tok *tok, const ds_batcher_cfg *c, ds_err *e);
/* Cancels everything still running, joins the thread (if started), frees. */
ds_batcher *ds_batcher_stop(ds_batcher *b);

void ds_batcher_submit(ds_batcher *b, ds_req *r);
void ds_batcher_cancel(ds_batcher *b, uint64_t id);
void ds_batcher_cancel_all(ds_batcher *b);
/* conn disconnected: its requests are dropped (no events) at the next step. */
void ds_batcher_conn_gone(ds_batcher *b, ds_conn *c);
/* Something a paused stream waits for happened (a ring was read, a socket drained). */
void ds_batcher_poke(ds_batcher *b);

/* Drops every cached prefix (at the next step, on the engine thread). */
void ds_batcher_cache_flush(ds_batcher *b);

/* Takes the outbox (a list in order). */
ds_out_msg *ds_batcher_take(ds_batcher *b);
void ds_out_msg_free(ds_out_msg *m);

void ds_batcher_stats_get(ds_batcher *b, ds_batcher_stats *st);
/* A copy of the running and waiting requests (malloc'd; free it). */
int ds_batcher_ps(ds_batcher *b, ds_ps_entry **out, int *n);

#endif

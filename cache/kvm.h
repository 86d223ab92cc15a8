/* kvm.h — the KV manager: the engine-side half of a batcher. It owns each
 * request's sequence and tokens (prompt + generated), runs the scheduler's
 * plan as one engine step (prefix-cache hits adopted, prompts in chunks,
 * preempted requests recomputed from their tokens) and hands back logits rows
 * for the caller to sample. The caller owns the requests' memory. One thread. */
#ifndef DS_KVM_H
#define DS_KVM_H

#include <stdint.h>

#include "cache/prefix.h"
#include "cache/sched.h"
#include "model/engine.h"

typedef struct ds_kvm ds_kvm;

typedef struct ds_kvm_req {
	ds_sched_req s;     /* first: uid and priority are the caller's */
	ds_seq *seq;        /* NULL while waiting */
	int32_t *tokens;    /* prompt then generated tokens; s.n_tokens of them */
	int cap;
	int n_prompt;
	int hit_tokens;     /* prompt tokens served from the cache at first admission */
	int accounted;
	int inserted;       /* full blocks offered to the prefix cache */
	void *user;
} ds_kvm_req;

typedef struct ds_kvm_config {
	int prefix_cache;     /* 1 on, 0 off */
	int step_tokens;      /* per-step token budget; 0 = 512 */
	int max_running;      /* sequences per step; 0 = 64 */
	int uid_max_running;  /* per client, 0 = no limit */
} ds_kvm_config;

typedef struct ds_kvm_stats {
	ds_prefix_stats prefix; /* blocks_* always filled, the rest with the cache on */
	ds_sched_stats sched;
} ds_kvm_stats;

int ds_kvm_new(ds_engine *eng, const ds_kvm_config *c, ds_kvm **out);
/* Remove every request first. Accepts NULL. */
ds_kvm *ds_kvm_free(ds_kvm *k);

/* Copies the prompt; uid/priority as given. */
int ds_kvm_req_init(ds_kvm_req *r, uint32_t uid, int priority, const int32_t *prompt, int n);
void ds_kvm_req_clear(ds_kvm_req *r);

/* Queues r: -E2BIG beyond the model's context, -ENOSPC beyond the pool. */
int ds_kvm_add(ds_kvm *k, ds_kvm_req *r);
/* Finished or cancelled: frees its sequence (full blocks stay cached). */
void ds_kvm_remove(ds_kvm *k, ds_kvm_req *r);
/* Appends a sampled token; the next step feeds it. Stop before the context
 * is full: a request with more tokens than the context fails with -E2BIG. */
int ds_kvm_push(ds_kvm_req *r, int32_t tok);

/* One engine step. logits holds max_running rows of vocab floats; on return
 * (*ready)[i] has its next-token logits in row i (its tokens are all cached);
 * (*failed)[0..*n_failed) were taken out (r->s.error). Returns the number of
 * ready requests, 0 when nothing could run, or -errno (e says why). */
int ds_kvm_step(ds_kvm *k, float *logits, ds_kvm_req ***ready, ds_kvm_req ***failed, int *n_failed, ds_err *e);

int ds_kvm_flush(ds_kvm *k);
ds_prefix *ds_kvm_prefix(ds_kvm *k);

/* The two prefix-cache calls a batcher needs around its own ds_sched ops.
 * Starts the empty s on the longest cached prefix of tokens[0..n) (at most
 * n - 1 tokens); returns the positions adopted (0 with pc NULL) or -errno. */
int ds_prefix_adopt(ds_prefix *pc, ds_seq *s, const int32_t *tokens, int n);
/* After a step: offers s's full blocks of tokens[0..n) (all final, n <=
 * ds_seq_len(s)) to the cache. A caller that keeps the MTP layer's KV in the
 * same blocks passes no more than ds_seq_mtp_len, so that a cached block is
 * complete for both. Returns blocks added (0 with pc NULL) or -errno. */
int ds_prefix_offer(ds_prefix *pc, const ds_seq *s, const int32_t *tokens, int n);
void ds_kvm_stats_get(const ds_kvm *k, ds_kvm_stats *st);

#endif

/* engine.h — the batch API every user of the model goes through (dsd
 * generate/logits, the daemon's batcher, speculative decoding).
 * An engine owns a backend and the KV block pool; a ds_seq owns its block
 * table and the blocks in it. One thread drives an engine and its seqs. */
#ifndef DS_ENGINE_H
#define DS_ENGINE_H

#include <stdint.h>

#include "cache/kv_pool.h"
#include "model/backend.h"
#include "model/err.h"
#include "model/model.h"

typedef struct ds_engine ds_engine;
typedef struct ds_seq ds_seq;

typedef struct ds_engine_config {
	const char *backend;   /* "cpu" (default) or "cuda" */
	int threads;           /* CPU threads, 0 = all cores */
	int block_tokens;      /* default 64 */
	int kv_blocks;         /* 0: derive from kv_bytes (CPU) or gpu_kv_fraction */
	size_t kv_bytes;       /* pool size; 0 = CPU: room for 8 full contexts, at most 1 GiB; GPU: gpu_kv_fraction */
	int device;
	double gpu_kv_fraction;
	int uring_load;        /* GPU backends: stream weights with io_uring (default 1) */
	int eager;             /* GPU backends: launch every kernel, no CUDA graphs (default 0) */
	ds_wload_progress *load_progress; /* optional: read from another thread while creating */
} ds_engine_config;

void ds_engine_config_default(ds_engine_config *c);

/* The engine keeps m (not owned); m must outlive it. */
int ds_engine_create(const ds_model *m, const ds_engine_config *c, ds_engine **out, ds_err *e);
ds_engine *ds_engine_free(ds_engine *eng);
const ds_model *ds_engine_model(const ds_engine *eng);
ds_kv_pool *ds_engine_pool(ds_engine *eng);
const char *ds_engine_backend_name(const ds_engine *eng);
/* How the backend streamed its weights (all zero when it did not: CPU, or
 * uring_load off). */
const ds_wload_result *ds_engine_load_result(const ds_engine *eng);

int ds_seq_new(ds_engine *eng, ds_seq **out);
/* Returns the seq's block references to the pool. Accepts NULL. */
ds_seq *ds_seq_free(ds_seq *s);
/* Positions whose main-model KV is cached. */
int ds_seq_len(const ds_seq *s);
/* Positions whose MTP-layer KV is cached (lags the main model by one, or
 * runs up to DS_MTP_MAX_AHEAD past it while chained drafts are pending). */
int ds_seq_mtp_len(const ds_seq *s);
/* Forget KV beyond position n (rollback of rejected draft tokens); blocks
 * no longer needed go back to the pool. */
int ds_seq_truncate(ds_seq *s, int n);
/* The block table (ds_seq_blocks_count entries); the cache manager uses it
 * to share prefix blocks. */
const int32_t *ds_seq_blocks(const ds_seq *s, int *count);
/* Starts s with n_tokens positions already cached in the given blocks (a
 * prefix-cache hit); takes a reference on each. s must be empty. */
int ds_seq_adopt_blocks(ds_seq *s, const int32_t *blocks, int n_blocks, int n_tokens);

enum { DS_LOGITS_NONE = 0, DS_LOGITS_LAST = 1, DS_LOGITS_ALL = 2 };

typedef struct ds_step_item {
	ds_seq *seq;
	const int32_t *tokens;
	int n;          /* >= 1 */
	int logits;     /* DS_LOGITS_* */
	/* ds_engine_step_ids: the caller takes only the argmax of this item's
	 * logit rows, which may be left unwritten in logits. */
	int argmax_only;
	/* ds_engine_step_ids on an engine that draws (ds_engine_draws): the
	 * token of the item's last row is drawn with this on the device (its id
	 * in ids, its logits row not written). DS_LOGITS_LAST items only. */
	const ds_draw *draw;
} ds_step_item;

/* Runs one forward step; appends each item's tokens to its seq. logits gets
 * the rows asked for, item by item ([rows][vocab]); hidden, if non-NULL, gets
 * [sum n][hidden] final-normed hidden states (the MTP input).
 * -ENOSPC when the pool cannot hold the new positions: nothing changed, the
 * caller preempts and retries. Other errors leave the seqs unchanged too. */
int ds_engine_step(ds_engine *eng, const ds_step_item *items, int n_items,
		   float *logits, float *hidden, ds_err *e);
/* The same, with ids[row] = the argmax of each logit row (first maximal
 * index). Rows of argmax_only items need not be written to logits: greedy
 * decoding on a GPU then downloads token ids instead of vocabulary rows. */
int ds_engine_step_ids(ds_engine *eng, const ds_step_item *items, int n_items, float *logits, int32_t *ids,
		       float *hidden, ds_err *e);
/* ds_engine_step_ids, then MTP layer 0 over the first n_chain items' new
 * positions in the same call: what a greedy speculative step needs (verify
 * the draft, then draft from the MTP module at the accepted position)
 * without a host round trip between the two on a GPU. Each chained item is
 * DS_LOGITS_ALL and argmax_only, without draw, and its MTP KV is level with
 * its main KV (ds_seq_mtp_len == ds_seq_len); the MTP token at its position
 * j is ids[its row j], the hidden input its final-normed hidden state
 * there. Afterwards both KV lengths have grown by n; mtp_ids[r] is the
 * argmax of the MTP logit row of row r (< the chained items' rows, which
 * come first). The chained items' rows of logits are unspecified.
 * depth > 1 (up to DS_MTP_MAX_AHEAD + 1) chains depth - 1 more MTP passes
 * of one position per chained item: its accepted count j is the number of
 * its leading rows whose argmax equals its next token (its drafts, checked
 * greedily); pass 2 runs at the position after row j, on the token
 * mtp_ids[row j] and the MTP output there, each later pass one position on
 * from the one before. Their argmaxes follow the rows in mtp_ids:
 * mtp_ids[Tc + (k - 2) * n_chain + i] for pass k and chained item i (Tc its
 * rows). The MTP KV of a chained item then ends level with its accepted
 * prefix (position of row j + 1), what greedy verification keeps.
 * On a backend that cannot chain, or with ds_engine_force_chain(-1), the
 * engine runs the steps itself (hidden states through the host): the same
 * ids. */
int ds_engine_step_chain(ds_engine *eng, const ds_step_item *items, int n_items, int n_chain, int depth,
			 float *logits, int32_t *ids, int32_t *mtp_ids, float *hidden, ds_err *e);
/* 1 when callers should chain (ds_engine_step_chain): the backend runs the
 * MTP step on the device (CUDA). Elsewhere the engine's steps do more
 * work than the unchained path (the MTP layer over rejected positions, MTP
 * logits for every row), so callers chain only when forced (on = 1): tests
 * of the chained path on the CPU. on = -1: never (the engine's own steps
 * even where the backend chains, a second code path for tests); 0: the
 * backend decides. */
int ds_engine_chains(const ds_engine *eng);
void ds_engine_force_chain(ds_engine *eng, int on);
/* 1 when the backend draws tokens itself (ds_step_item.draw): CUDA. */
int ds_engine_draws(const ds_engine *eng);

/* One MTP step (layer `depth`, 0-based): item i's tokens are the tokens at
 * positions seq_mtp_len+1 .. +n and hidden_in the main model's hidden states
 * at positions seq_mtp_len .. +n-1. logits rows as for ds_engine_step;
 * hidden_out (optional) is the MTP output for chaining. */
int ds_engine_mtp_step(ds_engine *eng, int depth, const ds_step_item *items, int n_items,
		       const float *hidden_in, float *logits, float *hidden_out, ds_err *e);
/* The same with ids[row] = the argmax of each logit row, as
 * ds_engine_step_ids (argmax_only items' rows need not be written). */
int ds_engine_mtp_step_ids(ds_engine *eng, int depth, const ds_step_item *items, int n_items,
			   const float *hidden_in, float *logits, int32_t *ids, float *hidden_out, ds_err *e);
/* Forget MTP KV beyond position n. */
int ds_seq_mtp_truncate(ds_seq *s, int n);

/* Tokens routed to each expert since the engine was created:
 * out[(n_layers + n_mtp) * n_routed_experts], by layer (dense layers 0).
 * -ENOTSUP when the backend does not count or the model has no experts. */
int ds_engine_expert_load(ds_engine *eng, uint64_t *out);

/* Rows of logits ds_engine_step will write for these items. */
int ds_engine_logit_rows(const ds_step_item *items, int n_items);

#endif

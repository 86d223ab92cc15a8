/* spec.h — speculative decoding with the model's own MTP module.
 * A ds_spec_req wraps one generating sequence (its ds_seq and sampler); each
 * ds_spec_step verifies every request's pending draft together with its last
 * token in one engine step, emits the accepted tokens plus one, rolls back
 * the KV of rejected drafts, and drafts again from the MTP module. Greedy
 * output equals plain decoding; with sampling, rejection sampling keeps the
 * main model's distribution. Engine thread only. */
#ifndef DS_SPEC_H
#define DS_SPEC_H

#include <stdint.h>

#include "model/engine.h"
#include "model/sampler.h"

#define DS_SPEC_MAX_DEPTH 4
_Static_assert(DS_SPEC_MAX_DEPTH - 1 <= DS_MTP_MAX_AHEAD, "chained drafts run the MTP module ahead");

typedef struct ds_spec_req {
	ds_seq *seq;
	ds_sampler *smp;
	int greedy;          /* temperature 0: drafts and checks by argmax */
	int depth;           /* drafts per step, 0 = plain decoding (no MTP KV either) */
	int want;            /* draft in the next call (1 after init); 0 only extends the MTP KV */
	/* state: KV holds positions < ds_seq_len; `last` is the newest emitted
	 * token, not yet in the cache; drafts follow it */
	int32_t last;
	int32_t draft[DS_SPEC_MAX_DEPTH];
	int n_draft;
	float *q;            /* [depth][vocab] draft distributions (sampling) */
	/* output of the latest call */
	int32_t out[DS_SPEC_MAX_DEPTH + 1];
	int n_out;
	/* counters */
	uint64_t drafted, accepted, steps;
} ds_spec_req;

/* Prepares r for seq/smp (depth 0..DS_SPEC_MAX_DEPTH, and 0 when the model
 * has no MTP layer). */
int ds_spec_req_init(ds_spec_req *r, const ds_engine *eng, ds_seq *seq, ds_sampler *smp, int greedy, int depth);
void ds_spec_req_clear(ds_spec_req *r);

/* Prefill: runs the prompt's uncached tokens (prompts[i], lens[i]; the seq
 * may hold an adopted prefix), samples the first token of each request
 * (r->out[0]) and, with depth > 0, runs the MTP module over the new
 * positions and drafts. */
int ds_spec_prefill(ds_engine *eng, ds_spec_req **reqs, const int32_t *const *prompts, const int *lens, int n,
		    ds_err *e);
/* One decode step for n requests: each gets 1 .. depth+1 tokens in out. */
int ds_spec_step(ds_engine *eng, ds_spec_req **reqs, int n, ds_err *e);

/* The two halves of a step, for a caller (the daemon's batcher) that runs the
 * main model itself, mixed with other sequences' prompt chunks.
 * ds_spec_verify: r's step fed `last` and its n_draft drafts; logits holds
 * those 1 + n_draft rows. Accepts the longest correct prefix (greedy) or by
 * the speculative-sampling rule, puts the accepted drafts plus one token in
 * out/n_out (sampler updated), and rolls the main and MTP KV back to `last`
 * and the accepted drafts. probs: scratch of vocab floats.
 * ds_spec_extend: runs the MTP module over the positions each request's
 * main KV gained beyond its MTP KV (ntok[i] of them, from ds_seq_mtp_len;
 * toks[i] the token after each, hid[i] the main model's final-normed hidden
 * rows) and drafts for requests with depth > 0 and want set. Requests with
 * depth 0 are skipped. Keeping the MTP KV in step with the main KV whether
 * or not a request drafts lets the caller switch drafting per step and keeps
 * shared prefix blocks valid for the MTP layer. */
int ds_spec_verify(ds_spec_req *r, const float *logits, int vocab, float *probs);
/* The same for greedy requests without penalties (ds_sampling_plain_greedy)
 * from ids[j] = the argmax of row j (the engine's ids; the rows themselves
 * are not needed): the same result. -EINVAL for other requests. */
int ds_spec_verify_ids(ds_spec_req *r, const int32_t *ids);
/* Greedy requests without penalties whose MTP KV is level with the main
 * KV verify and draft in one engine call (ds_engine_step_chain) where the
 * engine chains (ds_engine_chains), all chained requests of a call at one
 * depth: ds_spec_chainable says whether r can (its drafts and the deeper
 * passes' positions fit max_pos; MTP KV ahead of the main KV, from drafts
 * chained through the host, is cut back to level by the caller: the
 * chained step writes those positions again); ds_spec_verify_chained is
 * ds_spec_verify_ids for such a step, which keeps the MTP KV the step wrote
 * for the kept positions and, when r wants drafts and they fit max_pos,
 * drafts from mtp_ids (the MTP argmax rows of r's step rows) and, at depth
 * > 1, deep[(k - 2) * deep_stride] for pass k (r's column of the deeper
 * passes' argmaxes). */
int ds_spec_chainable(const ds_spec_req *r, int max_pos);
int ds_spec_verify_chained(ds_spec_req *r, const int32_t *ids, const int32_t *mtp_ids, const int32_t *deep,
			   int deep_stride, int max_pos);
/* ds_spec_extend's buffers, kept across calls (created on first use). */
typedef struct ds_spec_ws ds_spec_ws;
int ds_spec_extend(ds_engine *eng, ds_spec_ws **ws, ds_spec_req **reqs, int n, const int32_t *const *toks,
		   const int *ntok, const float *const *hid, ds_err *e);
ds_spec_ws *ds_spec_ws_free(ds_spec_ws *ws);

#endif

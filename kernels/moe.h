/* moe.h — DeepSeekMoE on the GPU: routing (V3: sigmoid, + correction bias
 * for the choice only, groups ranked by the sum of their top-2, top-k inside
 * the kept groups; V2: softmax, greedy top-k; weights normalized if asked,
 * times routed_scaling_factor), the permutation of (token, k) pairs into
 * per-expert row ranges padded to 16 rows, the gather of their inputs and
 * the weighted combine of the expert outputs with the shared experts'. */
#ifndef DSK_MOE_H
#define DSK_MOE_H

#include "kernels/dsk.h"

typedef struct dsk_route_cfg {
	int E, K, n_group, topk_group;
	int sigmoid;      /* else softmax */
	int method;       /* ds_topk_method */
	int norm_topk;
	float scale;      /* routed_scaling_factor */
} dsk_route_cfg;

/* logits[T][E] float -> ids[T][K], w[T][K]. bias[E] or NULL. */
DSK_EXTERN_C int dsk_moe_route(const dsk_route_cfg *c, const float *logits, const float *bias, int T, int32_t *ids,
			       float *w, dsk_stream s, ds_err *e);
/* From ids[T*K]: cnt[E] rows per expert, off[E+1] their first permuted row
 * (each range padded to 16), pos[T*K] the permuted row of each pair, and
 * row_tok[P] the token of each permuted row (-1 for padding), P = off[E].
 * P is at most T*K + 15*E. act (optional, [E+1]): the number of experts with
 * rows, then their ids in order. load (optional, [E]): each expert's pairs
 * are added to it (cumulative expert-load statistics). */
DSK_EXTERN_C int dsk_moe_plan(const int32_t *ids, int T, int K, int E, int32_t *cnt, int32_t *off, int32_t *pos,
			      int32_t *row_tok, int32_t *act, unsigned long long *load, int max_rows, dsk_stream s,
			      ds_err *e);
/* dsk_moe_route then dsk_moe_plan, in one launch for up to 32 tokens. */
DSK_EXTERN_C int dsk_moe_route_plan(const dsk_route_cfg *c, const float *logits, const float *bias, int T,
				    int32_t *ids, float *w, int32_t *cnt, int32_t *off, int32_t *pos, int32_t *row_tok,
				    int32_t *act, unsigned long long *load, int max_rows, dsk_stream s, ds_err *e);
/* xp[r] = x[row_tok[r]] (zeros for padding), bf16 rows of dim. */
DSK_EXTERN_C int dsk_moe_gather(dsk_bf16 *xp, const dsk_bf16 *x, const int32_t *row_tok, int P, int dim,
				dsk_stream s, ds_err *e);
/* out[t] = (shared ? shared[t] : 0) + sum_k w[t][k] * yp[pos[t*K+k]], rows of dim. */
DSK_EXTERN_C int dsk_moe_combine(float *out, const float *shared, const float *yp, const int32_t *pos, const float *w,
				 int T, int K, int dim, dsk_stream s, ds_err *e);

#endif

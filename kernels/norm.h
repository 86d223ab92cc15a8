/* norm.h — the residual stream's elementwise ops: embedding lookup, and
 * RMSNorm fused with the residual add (x += y; out = w * x / rms(x)), the
 * normed rows written as bf16 for the next GEMM and optionally as float32.
 * Shapes in rows of `dim` floats; asynchronous on the given stream. */
#ifndef DSK_NORM_H
#define DSK_NORM_H

#include "kernels/dsk.h"

/* x[t][dim] = float(emb[tok[t]][dim]) for t < T. */
DSK_EXTERN_C int dsk_embed(float *x, const dsk_bf16 *emb, const int32_t *tok, int T, int dim, dsk_stream s,
			   ds_err *e);
/* For each row t < T: if y, x[t] += y[t] (y row stride dim); then
 * ob[t*ldo ..] = bf16(w * x / rms), of[t*dim ..] = the same in float32 (if of). */
DSK_EXTERN_C int dsk_add_rmsnorm(float *x, const float *y, const float *w, int T, int dim, float eps, dsk_bf16 *ob,
				 int ldo, float *of, dsk_stream s, ds_err *e);
/* dsk_moe_combine (y[t] = shared[t] + sum_k wk[t][k] yp[pos[t*K+k]], shared
 * optional) then dsk_add_rmsnorm with that y, in one launch: the same bits. */
DSK_EXTERN_C int dsk_combine_add_rmsnorm(float *x, const float *shared, const float *yp, const int32_t *pos,
					 const float *wk, int K, const float *w, int T, int dim, float eps,
					 dsk_bf16 *ob, int ldo, float *of, dsk_stream s, ds_err *e);
/* out[i][dim] = in[idx[i]][dim] (bf16 rows) for i < n. */
DSK_EXTERN_C int dsk_gather_rows(dsk_bf16 *out, const dsk_bf16 *in, const int32_t *idx, int n, int dim,
				 dsk_stream s, ds_err *e);

#endif

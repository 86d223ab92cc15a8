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
/* An FP8 copy of the normed bf16 rows for the FP8 GEMMs that read them:
 * q[t*dim ..] e4m3 and scales s[kb*ld + t], bit for bit what dsk_quant_fp8
 * (kernels/gemm.h) writes for those rows (dim a multiple of 128), without
 * its launch. */
typedef struct dsk_qout {
	uint8_t *q;
	float *s;
	int ld;
} dsk_qout;

/* Rows of at most DSK_NORM_MAX_DIM, at most DSK_NORM_MAX_K experts a token
 * in the combine (-EINVAL beyond). */
#define DSK_NORM_MAX_DIM 8192
#define DSK_NORM_MAX_K 16

/* For each row t < T: if y, x[t] += y[t] (y row stride dim); then
 * ob[t*ldo ..] = bf16(w * x / rms), of[t*dim ..] = the same in float32 (if
 * of), and the FP8 copy of ob's row (if qo). */
DSK_EXTERN_C int dsk_add_rmsnorm(float *x, const float *y, const float *w, int T, int dim, float eps, dsk_bf16 *ob,
				 int ldo, float *of, const dsk_qout *qo, dsk_stream s, ds_err *e);
/* dsk_moe_combine (y[t] = shared[t] + sum_k wk[t][k] yp[pos[t*K+k]], shared
 * optional) then dsk_add_rmsnorm with that y, in one launch: the same bits. */
DSK_EXTERN_C int dsk_combine_add_rmsnorm(float *x, const float *shared, const float *yp, const int32_t *pos,
					 const float *wk, int K, const float *w, int T, int dim, float eps,
					 dsk_bf16 *ob, int ldo, float *of, const dsk_qout *qo, dsk_stream s,
					 ds_err *e);
/* out[i][dim] = in[idx[i]][dim] (bf16 rows) for i < n. */
DSK_EXTERN_C int dsk_gather_rows(dsk_bf16 *out, const dsk_bf16 *in, const int32_t *idx, int n, int dim,
				 dsk_stream s, ds_err *e);

#endif

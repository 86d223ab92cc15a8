/* flash.h — causal prefill attention in one kernel (FlashAttention-2's
 * scheme) for MLA in its expanded form: for new token i < n of one sequence
 * (at position p0 + i) and head h, s_j = scale * (q_nope . k_hj + q_pe .
 * kpe_j) over positions j <= p0 + i, o = softmax(s) v_h. Keys and values of
 * each head come from one GEMM of the sequence's latent rows (kv[h][j] =
 * [W_UK_h c_j ; W_UV_h c_j]); the scores stay on the SM. bf16 in and out,
 * float32 accumulation; the probabilities enter the second product as a
 * bf16 pair (~16 mantissa bits).
 * Shapes: dsk_flash_ok's (nope, rope, vd) only. */
#ifndef DSK_FLASH_H
#define DSK_FLASH_H

#include "kernels/dsk.h"

typedef struct dsk_flash_args {
	const dsk_bf16 *q;   /* [n][q_ld]: head h at h * (nope + rope), q_pe roped */
	const dsk_bf16 *kv;  /* [nh][len][nope + vd] */
	const dsk_bf16 *kpe; /* [len][kpe_ld]: the roped keys all heads share */
	dsk_bf16 *o;         /* out: [n][o_ld], head h at h * vd */
	int q_ld, kpe_ld, o_ld;
	int nh, nope, rope, vd;
	int n, len, p0;      /* keys j < len, each query's j <= p0 + i */
	float scale;
} dsk_flash_args;

DSK_EXTERN_C int dsk_flash_ok(int nope, int rope, int vd);
DSK_EXTERN_C int dsk_flash_prefill(const dsk_flash_args *a, dsk_stream s, ds_err *e);

#endif

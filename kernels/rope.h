/* rope.h — MLA's per-token preparation after the kv_a and q projections:
 * the latent c = RMSNorm(kv[:, :kvl]) and the key part k_pe = RoPE(kv[:, kvl:])
 * written to the paged cache (bf16, [block][layer][slot][kvl + rope]), and
 * RoPE applied to each head's q_pe in place, with q also copied to bf16.
 * RoPE rotates pairs (2i, 2i+1) by pos * inv_freq[i], cos/sin times attn_factor. */
#ifndef DSK_ROPE_H
#define DSK_ROPE_H

#include "kernels/dsk.h"

typedef struct dsk_kv_geom {
	dsk_bf16 *pool;       /* cache base */
	long block_stride;    /* elements per block (all layers) */
	long layer_stride;    /* elements per layer within a block */
	int block_tokens;
	const int32_t *tables;/* [n_seqs][max_blocks] */
	int max_blocks;
} dsk_kv_geom;

/* kv[T][kvl+rope] float, q[T][nh*(nope+rope)] float; per token its sequence
 * seq[t] and position pos[t]; qb gets bf16 q. */
DSK_EXTERN_C int dsk_mla_prep(const dsk_kv_geom *g, int layer, const float *kv, const float *norm_w, float eps,
			      float *q, dsk_bf16 *qb, int nh, int nope, int rope, int kvl, const float *inv_freq,
			      float attn_factor, const int32_t *seq, const int32_t *pos, int T, dsk_stream s, ds_err *e);

#endif

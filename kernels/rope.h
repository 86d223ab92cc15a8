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

/* Decode-sized steps (T <= DSK_ABSORB_MAX_T) can have the W_UK absorption
 * done in the same launch (16-byte rows of W_UK; its partial sums fit the
 * 48 KB of shared memory up to nope 256). */
#define DSK_ABSORB_MAX_T 8
static inline int dsk_mla_absorb_ok(int nope, int kvl) { return kvl % 8 == 0 && nope <= 256; }

/* kv[T][kvl+rope] float, q[T][nh*(nope+rope)] float; per token its sequence
 * seq[t] and position pos[t]; qb gets bf16 q. With kvb (kv_b_proj, bf16
 * [nh*(nope+vd)][kvl]) also qabs[t][h][kvl] = W_UK_h^T q_nope[t][h] (float,
 * from float q; the GEMM path absorbs from bf16 qb). */
DSK_EXTERN_C int dsk_mla_prep(const dsk_kv_geom *g, int layer, const float *kv, const float *norm_w, float eps,
			      float *q, dsk_bf16 *qb, int nh, int nope, int rope, int kvl, const float *inv_freq,
			      float attn_factor, const int32_t *seq, const int32_t *pos, int T, const dsk_bf16 *kvb,
			      int vd, float *qabs, dsk_stream s, ds_err *e);

#endif

/* attn.h — absorbed MLA attention over the paged latent cache.
 * For token t (sequence seq[t], position pos[t]) and head h, with the query
 * absorbed into latent space qa = W_UK_h^T q_nope (qabs[t][h][kvl]) and its
 * roped part q_pe: s_j = (qa . c_j + q_pe . kpe_j) * scale over cached
 * positions j <= pos[t], p = softmax(s), lat[t][h] = sum_j p_j c_j (bf16).
 * Split-KV: each of nsplit blocks takes a range of positions, and a second
 * kernel merges their (max, sum, partial) triples. Causal prefill is the
 * same call with one query row per new token. */
#ifndef DSK_ATTN_H
#define DSK_ATTN_H

#include "kernels/rope.h"

typedef struct dsk_attn_args {
	dsk_kv_geom g;
	int layer;
	const float *q;     /* [T][nh][nope+rope], q_pe already roped */
	const float *qabs;  /* [T][nh][kvl] */
	int nh, nope, rope, kvl;
	const int32_t *seq, *pos;
	int T, max_len;     /* max over t of pos[t]+1 */
	float scale;
	float *ws;          /* dsk_attn_ws_floats(...) floats */
	dsk_bf16 *lat;      /* out: [T][nh][kvl] */
	const int32_t *list;/* tokens to attend for (n_list of them), or NULL: all */
	int n_list;
} dsk_attn_args;

/* Splits chosen for a step (fills the GPU for short batches). */
DSK_EXTERN_C int dsk_attn_splits(int T, int nh, int max_len, int sms);
DSK_EXTERN_C size_t dsk_attn_ws_floats(int T, int nh, int kvl, int nsplit);
DSK_EXTERN_C int dsk_mla_attention(const dsk_attn_args *a, int nsplit, dsk_stream s, ds_err *e);

/* Prefill of one long sequence through tensor-core GEMMs (the caller runs
 * them with cuBLAS: kernels/cuda_backend.c prefill_attention): its cache
 * rows gathered to kc[len][kvl+rope]; scores S[h][i][len] of each query
 * against the keys; then a causal softmax in place (query i sits at
 * position p0+i), leaving bf16 probabilities in the first half of each row
 * (row stride 2*len bf16), for lat = P kc[:, :kvl]. len <= 8192. */
DSK_EXTERN_C int dsk_kv_gather(const dsk_kv_geom *g, int layer, const int32_t *table, int len, int kvd, dsk_bf16 *kc,
			       dsk_stream s, ds_err *e);
DSK_EXTERN_C int dsk_causal_softmax(float *S, int rows, int len, int n, int p0, float scale, dsk_stream s, ds_err *e);

#endif

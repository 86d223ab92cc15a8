/* cpu_ops.h — the CPU reference for each operation of the forward pass, in
 * float32 on weights of any stored dtype (BF16/F16/F32, or FP8 e4m3 with
 * 128x128 block scales, dequantized inside the matmul: no weight is copied).
 * CUDA kernels are tested against these. Functions marked (parallel) use an
 * OpenMP team; the others are single-threaded so they can run inside one. */
#ifndef DS_CPU_OPS_H
#define DS_CPU_OPS_H

#include <stdint.h>

#include "model/model.h"

/* (parallel) out[n][W.rows] = x[n][W.cols] @ W^T */
void ds_cpu_matmul(float *out, const float *x, int n, const ds_wmat *W);
/* out[nrows] = W[row0 .. row0+nrows) @ x[W.cols] */
void ds_cpu_matvec_rows(float *out, const float *x, const ds_wmat *W, int row0, int nrows);
/* out[W.cols] = x[nrows] @ W[row0 .. row0+nrows)  (the transposed product) */
void ds_cpu_vecmat_rows(float *out, const float *x, const ds_wmat *W, int row0, int nrows);
/* Row r of W as float32 into dst[W.cols]. */
void ds_cpu_weight_row(float *dst, const ds_wmat *W, int r);
/* A 1-D float tensor (norm weights, biases) into dst[n]. */
void ds_cpu_vec_load(float *dst, const ds_tensor_ref *t, int n);
/* Row `id` of an embedding table [vocab][dim] into dst[dim]. */
void ds_cpu_embed_row(float *dst, const ds_tensor_ref *emb, int id, int dim);

/* out[dim] = x / rms(x) * w  (w already float32); out may alias x. */
void ds_cpu_rmsnorm(float *out, const float *x, const float *w, int dim, float eps);
/* Rotates consecutive pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i],
 * scaling by cos/sin tables precomputed as cos_sin[2*i], [2*i+1]. */
void ds_cpu_rope(float *x, const float *cos_sin, int dim);
/* x[n] <- silu(gate[n]) * up[n] written into gate. */
void ds_cpu_silu_mul(float *gate, const float *up, int n);
/* In-place softmax of x[n]; returns nothing. */
void ds_cpu_softmax(float *x, int n);
static inline float ds_cpu_dot(const float *a, const float *b, int n)
{
	float s = 0;
#pragma omp simd reduction(+ : s)
	for (int i = 0; i < n; i++)
		s += a[i] * b[i];
	return s;
}

/* RoPE inverse frequencies for dim rope dims (dim/2 values) and the
 * attention factor YaRN multiplies cos/sin by, as transformers computes them. */
void ds_rope_inv_freq(const ds_config *c, float *inv_freq, float *attn_factor);

/* MoE routing for one token: scores[E] are the router logits (modified in
 * place into probabilities); writes top-k expert ids and weights. */
void ds_cpu_route(const ds_config *c, float *logits, const float *bias, int32_t *ids, float *weights);

#endif

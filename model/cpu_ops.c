#include "model/cpu_ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Per-thread scratch for converting a weight row; grows to the widest row. */
static _Thread_local float *tl_row;
static _Thread_local int tl_cap;

static float *row_scratch(int n)
{
	if (n > tl_cap) {
		free(tl_row);
		tl_row = malloc(sizeof(float) * (size_t)n);
		tl_cap = tl_row ? n : 0;
	}
	return tl_row;
}

static float scale_at(const ds_tensor_ref *s, int i)
{
	if (s->dtype == DS_DT_F32)
		return ((const float *)s->data)[i];
	return ds_bf16_to_f32(((const uint16_t *)s->data)[i]);
}

void ds_cpu_weight_row(float *dst, const ds_wmat *W, int r)
{
	const int n = W->cols;
	switch (W->w->dtype) {
	case DS_DT_F32:
		memcpy(dst, (const float *)W->w->data + (size_t)r * n, sizeof(float) * (size_t)n);
		break;
	case DS_DT_BF16: {
		const uint16_t *src = (const uint16_t *)W->w->data + (size_t)r * n;
#pragma omp simd
		for (int i = 0; i < n; i++) {
			uint32_t u = (uint32_t)src[i] << 16;
			memcpy(&dst[i], &u, 4);
		}
		break;
	}
	case DS_DT_F16: {
		const uint16_t *src = (const uint16_t *)W->w->data + (size_t)r * n;
		for (int i = 0; i < n; i++)
			dst[i] = ds_f16_to_f32(src[i]);
		break;
	}
	case DS_DT_F8_E4M3: {
		const uint8_t *src = (const uint8_t *)W->w->data + (size_t)r * n;
		const int sc = (n + 127) / 128;
		for (int b = 0; b < sc; b++) {
			float s = scale_at(W->scale_inv, (r / 128) * sc + b);
			int end = (b + 1) * 128 < n ? (b + 1) * 128 : n;
#pragma omp simd
			for (int i = b * 128; i < end; i++)
				dst[i] = ds_fp8e4m3_lut[src[i]] * s;
		}
		break;
	}
	default:
		memset(dst, 0, sizeof(float) * (size_t)n);
	}
}

void ds_cpu_matmul(float *out, const float *x, int n, const ds_wmat *W)
{
	const int rows = W->rows, cols = W->cols;
	const int direct = W->w->dtype == DS_DT_F32;
#pragma omp parallel for schedule(static)
	for (int r = 0; r < rows; r++) {
		const float *w;
		if (direct) {
			w = (const float *)W->w->data + (size_t)r * cols;
		} else {
			float *buf = row_scratch(cols);
			ds_cpu_weight_row(buf, W, r);
			w = buf;
		}
		for (int t = 0; t < n; t++)
			out[(size_t)t * rows + r] = ds_cpu_dot(w, x + (size_t)t * cols, cols);
	}
}

void ds_cpu_matvec_rows(float *out, const float *x, const ds_wmat *W, int row0, int nrows)
{
	float *buf = row_scratch(W->cols);
	for (int r = 0; r < nrows; r++) {
		ds_cpu_weight_row(buf, W, row0 + r);
		out[r] = ds_cpu_dot(buf, x, W->cols);
	}
}

void ds_cpu_vecmat_rows(float *out, const float *x, const ds_wmat *W, int row0, int nrows)
{
	const int cols = W->cols;
	float *buf = row_scratch(cols);
	memset(out, 0, sizeof(float) * (size_t)cols);
	for (int r = 0; r < nrows; r++) {
		ds_cpu_weight_row(buf, W, row0 + r);
		const float a = x[r];
#pragma omp simd
		for (int c = 0; c < cols; c++)
			out[c] += a * buf[c];
	}
}

void ds_cpu_vec_load(float *dst, const ds_tensor_ref *t, int n)
{
	ds_wmat m = { .w = t, .rows = 1, .cols = n };
	ds_cpu_weight_row(dst, &m, 0);
}

void ds_cpu_embed_row(float *dst, const ds_tensor_ref *emb, int id, int dim)
{
	ds_wmat m = { .w = emb, .rows = (int)emb->shape[0], .cols = dim };
	ds_cpu_weight_row(dst, &m, id);
}

void ds_cpu_rmsnorm(float *out, const float *x, const float *w, int dim, float eps)
{
	/* Accumulated in double: transformers computes the variance in float32
	 * over a tensor, and the order of a float32 sum is not ours to match. */
	double ss = 0;
	for (int i = 0; i < dim; i++)
		ss += (double)x[i] * x[i];
	float inv = (float)(1.0 / sqrt(ss / dim + eps));
	for (int i = 0; i < dim; i++)
		out[i] = w[i] * (x[i] * inv);
}

void ds_cpu_rope(float *x, const float *cs, int dim)
{
	for (int i = 0; i < dim / 2; i++) {
		float c = cs[2 * i], s = cs[2 * i + 1];
		float a = x[2 * i], b = x[2 * i + 1];
		x[2 * i] = a * c - b * s;
		x[2 * i + 1] = b * c + a * s;
	}
}

void ds_cpu_silu_mul(float *g, const float *u, int n)
{
	for (int i = 0; i < n; i++)
		g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void ds_cpu_softmax(float *x, int n)
{
	float m = -INFINITY;
	for (int i = 0; i < n; i++)
		m = x[i] > m ? x[i] : m;
	double s = 0;
	for (int i = 0; i < n; i++) {
		x[i] = expf(x[i] - m);
		s += x[i];
	}
	float inv = (float)(1.0 / s);
	for (int i = 0; i < n; i++)
		x[i] *= inv;
}

static double yarn_mscale(double scale, double mscale)
{
	return scale <= 1 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

static double yarn_corr_dim(double rot, int dim, double base, double maxpos)
{
	return (dim * log(maxpos / (rot * 2 * M_PI))) / (2 * log(base));
}

void ds_rope_inv_freq(const ds_config *c, float *inv_freq, float *attn_factor)
{
	const int dim = c->qk_rope_head_dim;
	const double base = c->rope_theta;
	*attn_factor = 1.0f;
	for (int i = 0; i < dim / 2; i++) {
		/* float32 as transformers computes base ** (arange(0, dim, 2) / dim) */
		float pos_freq = powf((float)base, (float)(2 * i) / (float)dim);
		inv_freq[i] = 1.0f / pos_freq;
	}
	if (c->rope.type != DS_ROPE_YARN)
		return;
	const double f = c->rope.factor;
	if (c->rope.mscale != 0 && c->rope.mscale_all_dim != 0)
		*attn_factor = (float)(yarn_mscale(f, c->rope.mscale) / yarn_mscale(f, c->rope.mscale_all_dim));
	else
		*attn_factor = (float)yarn_mscale(f, 1.0);
	double low = floor(yarn_corr_dim(c->rope.beta_fast, dim, base, c->rope.original_max_position_embeddings));
	double high = ceil(yarn_corr_dim(c->rope.beta_slow, dim, base, c->rope.original_max_position_embeddings));
	if (low < 0)
		low = 0;
	if (high > dim - 1)
		high = dim - 1;
	if (low == high)
		high += 0.001;
	for (int i = 0; i < dim / 2; i++) {
		float pos_freq = 1.0f / inv_freq[i];
		float extra = 1.0f / pos_freq, inter = 1.0f / ((float)f * pos_freq);
		float ramp = (float)(((double)i - low) / (high - low));
		ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
		float extra_factor = 1.0f - ramp;
		inv_freq[i] = inter * (1 - extra_factor) + extra * extra_factor;
	}
}

/* Indices of the k largest of v[n] (ties: lower index first), into idx. */
static void topk(const float *v, int n, int k, int32_t *idx)
{
	for (int j = 0; j < k; j++) {
		int best = -1;
		for (int i = 0; i < n; i++) {
			int taken = 0;
			for (int q = 0; q < j; q++)
				taken |= idx[q] == i;
			if (!taken && (best < 0 || v[i] > v[best]))
				best = i;
		}
		idx[j] = best;
	}
}

void ds_cpu_route(const ds_config *c, float *s, const float *bias, int32_t *ids, float *w)
{
	const int E = c->n_routed_experts, K = c->num_experts_per_tok;
	const int G = c->n_group, per = E / G;
	if (c->scoring_func == DS_SCORE_SIGMOID)
		for (int i = 0; i < E; i++)
			s[i] = 1.0f / (1.0f + expf(-s[i]));
	else
		ds_cpu_softmax(s, E);
	float choice[4096];
	for (int i = 0; i < E; i++)
		choice[i] = s[i] + (bias && c->topk_method == DS_TOPK_NOAUX_TC ? bias[i] : 0.0f);
	if (c->topk_method != DS_TOPK_GREEDY && G > 1) {
		float gscore[4096];
		for (int g = 0; g < G; g++) {
			const float *v = choice + g * per;
			if (c->topk_method == DS_TOPK_NOAUX_TC) {
				int32_t t2[2];
				topk(v, per, 2, t2);
				gscore[g] = v[t2[0]] + v[t2[1]];
			} else {
				float m = v[0];
				for (int i = 1; i < per; i++)
					m = v[i] > m ? v[i] : m;
				gscore[g] = m;
			}
		}
		int32_t gsel[4096];
		topk(gscore, G, c->topk_group, gsel);
		unsigned char keep[4096] = { 0 };
		for (int j = 0; j < c->topk_group; j++)
			memset(keep + gsel[j] * per, 1, (size_t)per);
		/* V3 (noaux_tc) masks the other groups with -inf, as DeepSeek's and
		 * transformers' code do; V2's group_limited_greedy masks with 0. */
		for (int i = 0; i < E; i++)
			if (!keep[i])
				choice[i] = c->topk_method == DS_TOPK_NOAUX_TC ? -INFINITY : 0.0f;
	}
	topk(choice, E, K, ids);
	double sum = 0;
	for (int j = 0; j < K; j++) {
		w[j] = s[ids[j]];
		sum += w[j];
	}
	if (c->norm_topk_prob)
		for (int j = 0; j < K; j++)
			w[j] = (float)(w[j] / (sum + 1e-20));
	for (int j = 0; j < K; j++)
		w[j] *= c->routed_scaling_factor;
}

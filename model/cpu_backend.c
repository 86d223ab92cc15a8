/* cpu_backend.c — the reference backend: the DeepSeek-V2/V3 forward pass in
 * float32 on the mmap'ed weights, KV pool in host memory.
 * KV layout: [block][layer][token in block][kv_lora_rank + qk_rope_head_dim],
 * the normalized latent first, then the roped key part. */
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "model/backend.h"
#include "model/cpu_ops.h"
#include "model/sampler.h"

/* q_a_layernorm and kv_a_layernorm are built with the RMSNorm default eps in
 * DeepSeek's and transformers' code, whatever rms_norm_eps says. */
#define DS_LORA_NORM_EPS 1e-6f

typedef struct {
	float *input_norm, *post_attn_norm, *q_a_norm, *kv_a_norm, *router_bias;
	float *enorm, *hnorm, *head_norm;
} layer_vecs;

struct ds_backend {
	const ds_model *m;
	int threads;
	int kv_blocks, block_tokens;
	float *kv;
	size_t kv_layer_stride, kv_block_stride; /* floats */
	layer_vecs *lv;
	uint64_t *eload;   /* [layer][expert] tokens routed, since create */
	float *final_norm;
	float *inv_freq;
	float attn_factor;
	float softmax_scale;
	/* scratch, grown on demand */
	float *buf;
	size_t buf_cap;
};

static void destroy(ds_backend *b)
{
	if (!b)
		return;
	if (b->lv) {
		for (int i = 0; i < b->m->n_layers + b->m->n_mtp; i++) {
			layer_vecs *v = &b->lv[i];
			free(v->input_norm);
			free(v->post_attn_norm);
			free(v->q_a_norm);
			free(v->kv_a_norm);
			free(v->router_bias);
			free(v->enorm);
			free(v->hnorm);
			free(v->head_norm);
		}
	}
	free(b->lv);
	free(b->eload);
	free(b->final_norm);
	free(b->inv_freq);
	free(b->kv);
	free(b->buf);
	free(b);
}

static float *load_vec(ds_wvec t, int n)
{
	if (!t)
		return NULL;
	float *v = malloc(sizeof(float) * (size_t)n);
	if (v)
		ds_cpu_vec_load(v, t, n);
	return v;
}

static int create(const ds_model *m, ds_backend_config *cfg, ds_backend **out, ds_err *e)
{
	const ds_config *c = &m->cfg;
	ds_backend *b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->m = m;
	b->threads = cfg->threads > 0 ? cfg->threads : omp_get_num_procs();
	b->kv_blocks = cfg->kv_blocks;
	b->block_tokens = cfg->block_tokens;
	if (b->kv_blocks <= 0 || b->block_tokens <= 0) {
		destroy(b);
		return ds_errf(e, -EINVAL, "cpu backend: the KV pool needs kv_blocks > 0 and block_tokens > 0");
	}
	const int L = m->n_layers + m->n_mtp, kvd = ds_config_kv_dim(c);
	b->kv_layer_stride = (size_t)b->block_tokens * kvd;
	b->kv_block_stride = b->kv_layer_stride * L;
	size_t bytes = sizeof(float) * b->kv_block_stride * (size_t)b->kv_blocks;
	b->kv = malloc(bytes);
	b->lv = calloc((size_t)L, sizeof(layer_vecs));
	b->eload = calloc((size_t)L * (c->n_routed_experts > 0 ? c->n_routed_experts : 1), sizeof(uint64_t));
	b->final_norm = load_vec(m->final_norm, c->hidden_size);
	b->inv_freq = malloc(sizeof(float) * (size_t)c->qk_rope_head_dim);
	if (!b->kv || !b->lv || !b->eload || !b->final_norm || !b->inv_freq) {
		destroy(b);
		return ds_errf(e, -ENOMEM, "cpu backend: cannot allocate %zu bytes of KV pool", bytes);
	}
	for (int i = 0; i < L; i++) {
		const ds_layer_w *w = &m->layers[i];
		layer_vecs *v = &b->lv[i];
		v->input_norm = load_vec(w->input_norm, c->hidden_size);
		v->post_attn_norm = load_vec(w->post_attn_norm, c->hidden_size);
		v->q_a_norm = load_vec(w->q_a_norm, c->q_lora_rank);
		v->kv_a_norm = load_vec(w->kv_a_norm, c->kv_lora_rank);
		v->router_bias = load_vec(w->router_bias, c->n_routed_experts);
		v->enorm = load_vec(w->enorm, c->hidden_size);
		v->hnorm = load_vec(w->hnorm, c->hidden_size);
		v->head_norm = load_vec(w->head_norm, c->hidden_size);
	}
	ds_rope_inv_freq(c, b->inv_freq, &b->attn_factor);
	b->softmax_scale = (float)ds_config_softmax_scale(c);
	*out = b;
	return 0;
}

static float *kv_slot(ds_backend *b, const int32_t *table, int layer, int pos)
{
	int32_t blk = table[pos / b->block_tokens];
	return b->kv + (size_t)blk * b->kv_block_stride + (size_t)layer * b->kv_layer_stride +
	       (size_t)(pos % b->block_tokens) * ds_config_kv_dim(&b->m->cfg);
}

/* Per-token bookkeeping for a step. */
typedef struct {
	int T;            /* tokens in the step */
	int *seq_of;      /* token -> sequence */
	int *pos;         /* token -> absolute position */
	const ds_batch *batch;
} step_map;

static float *scratch(ds_backend *b, size_t floats)
{
	if (floats > b->buf_cap) {
		free(b->buf);
		b->buf = malloc(sizeof(float) * floats);
		b->buf_cap = b->buf ? floats : 0;
	}
	return b->buf;
}

/* MLA attention of one layer: x[T][H] (already normed) -> out[T][H]. */
static void attention(ds_backend *b, int li, const step_map *sm, const float *x, float *out, float *ws)
{
	const ds_model *m = b->m;
	const ds_config *c = &m->cfg;
	const ds_layer_w *w = &m->layers[li];
	const layer_vecs *v = &b->lv[li];
	const int T = sm->T, H = c->hidden_size, nh = c->num_attention_heads;
	const int nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, qk = nope + rope;
	const int vd = c->v_head_dim, kvl = c->kv_lora_rank, kvd = kvl + rope;
	float *q = ws;                          /* [T][nh*qk] */
	float *kv = q + (size_t)T * nh * qk;    /* [T][kvd] */
	float *qabs = kv + (size_t)T * kvd;     /* [T][nh][kvl] */
	float *lat = qabs + (size_t)T * nh * kvl; /* [T][nh][kvl] */
	float *o = lat + (size_t)T * nh * kvl;  /* [T][nh*vd] */
	float *tmp = o + (size_t)T * nh * vd;   /* [T][q_lora] */

	if (c->q_lora_rank > 0) {
		ds_cpu_matmul(tmp, x, T, &w->q_a_proj);
		for (int t = 0; t < T; t++)
			ds_cpu_rmsnorm(tmp + (size_t)t * c->q_lora_rank, tmp + (size_t)t * c->q_lora_rank, v->q_a_norm,
				       c->q_lora_rank, DS_LORA_NORM_EPS);
		ds_cpu_matmul(q, tmp, T, &w->q_b_proj);
	} else {
		ds_cpu_matmul(q, x, T, &w->q_proj);
	}
	ds_cpu_matmul(kv, x, T, &w->kv_a_proj);

	/* Normalize the latent, rope the key and query parts, write the cache. */
#pragma omp parallel for schedule(static)
	for (int t = 0; t < T; t++) {
		float cs[2 * 512];
		const int p = sm->pos[t];
		for (int i = 0; i < rope / 2; i++) {
			float ang = (float)p * b->inv_freq[i];
			cs[2 * i] = cosf(ang) * b->attn_factor;
			cs[2 * i + 1] = sinf(ang) * b->attn_factor;
		}
		float *kt = kv + (size_t)t * kvd;
		ds_cpu_rmsnorm(kt, kt, v->kv_a_norm, kvl, DS_LORA_NORM_EPS);
		ds_cpu_rope(kt + kvl, cs, rope);
		for (int h = 0; h < nh; h++)
			ds_cpu_rope(q + (size_t)t * nh * qk + (size_t)h * qk + nope, cs, rope);
		const int s = sm->seq_of[t];
		memcpy(kv_slot(b, sm->batch->block_tables[s], li, p), kt, sizeof(float) * (size_t)kvd);
	}

	/* Absorb W_UK into the query: qabs[t][h] = W_UK_h^T q_nope[t][h]. */
#pragma omp parallel for schedule(static)
	for (int th = 0; th < T * nh; th++) {
		int t = th / nh, h = th % nh;
		ds_cpu_vecmat_rows(qabs + (size_t)th * kvl, q + (size_t)t * nh * qk + (size_t)h * qk, &w->kv_b_proj,
				   h * (nope + vd), nope);
	}

	/* Scores over the cached positions 0..p, softmax, weighted latent sum. */
#pragma omp parallel
	{
		float *sc = NULL;
		int sc_cap = 0;
#pragma omp for schedule(dynamic, 1)
		for (int th = 0; th < T * nh; th++) {
			int t = th / nh, h = th % nh;
			const int p = sm->pos[t], n = p + 1;
			const int32_t *table = sm->batch->block_tables[sm->seq_of[t]];
			if (n > sc_cap) {
				free(sc);
				sc_cap = n + 64;
				sc = malloc(sizeof(float) * (size_t)sc_cap);
			}
			if (!sc)
				continue; /* cannot happen in practice; leaves lat unset */
			const float *qa = qabs + (size_t)th * kvl;
			const float *qp = q + (size_t)t * nh * qk + (size_t)h * qk + nope;
			for (int j = 0; j < n; j++) {
				const float *kj = kv_slot(b, table, li, j);
				sc[j] = (ds_cpu_dot(qa, kj, kvl) + ds_cpu_dot(qp, kj + kvl, rope)) * b->softmax_scale;
			}
			ds_cpu_softmax(sc, n);
			float *l = lat + (size_t)th * kvl;
			memset(l, 0, sizeof(float) * (size_t)kvl);
			for (int j = 0; j < n; j++) {
				const float *kj = kv_slot(b, table, li, j);
				const float pj = sc[j];
#pragma omp simd
				for (int d = 0; d < kvl; d++)
					l[d] += pj * kj[d];
			}
		}
		free(sc);
	}

	/* Back out of the latent space through W_UV, per head. */
#pragma omp parallel for schedule(static)
	for (int th = 0; th < T * nh; th++) {
		int h = th % nh;
		ds_cpu_matvec_rows(o + (size_t)th * vd, lat + (size_t)th * kvl, &w->kv_b_proj, h * (nope + vd) + nope,
				   vd);
	}
	ds_cpu_matmul(out, o, T, &w->o_proj);
	(void)H;
}

static size_t attention_ws(const ds_config *c, int T)
{
	const int nh = c->num_attention_heads, qk = ds_config_qk_head_dim(c);
	return (size_t)T * ((size_t)nh * qk + ds_config_kv_dim(c) + 2 * (size_t)nh * c->kv_lora_rank +
			    (size_t)nh * c->v_head_dim + (size_t)c->q_lora_rank);
}

/* silu(x W_g^T) * (x W_u^T) W_d^T for n rows. */
static void mlp(const ds_wmat *g, const ds_wmat *u, const ds_wmat *d, const float *x, int n, float *out,
		float *ws)
{
	const int I = g->rows;
	float *gb = ws, *ub = ws + (size_t)n * I;
	ds_cpu_matmul(gb, x, n, g);
	ds_cpu_matmul(ub, x, n, u);
	ds_cpu_silu_mul(gb, ub, n * I);
	ds_cpu_matmul(out, gb, n, d);
}

static void moe(ds_backend *b, int li, int T, const float *x, float *out, float *ws)
{
	const ds_model *m = b->m;
	const ds_config *c = &m->cfg;
	const ds_layer_w *w = &m->layers[li];
	const int H = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
	const int I = c->moe_intermediate_size;
	float *logits = ws;                             /* [T][E] */
	int32_t *ids = (int32_t *)(logits + (size_t)T * E); /* [T][K] */
	float *wt = (float *)(ids + (size_t)T * K);     /* [T][K] */
	int *count = (int *)(wt + (size_t)T * K);       /* [E] */
	int *rows = count + E;                          /* [T*K] token list by expert */
	int *slot = rows + (size_t)T * K;               /* [T*K] (token, k) index */
	float *xs = (float *)(slot + (size_t)T * K);    /* [T][H] gathered */
	float *ys = xs + (size_t)T * H;                 /* [T][H] */
	float *mw = ys + (size_t)T * H;                 /* mlp workspace */

	ds_cpu_matmul(logits, x, T, &w->router);
	for (int t = 0; t < T; t++)
		ds_cpu_route(c, logits + (size_t)t * E, b->lv[li].router_bias, ids + (size_t)t * K, wt + (size_t)t * K);

	if (c->n_shared_experts > 0)
		mlp(&w->sh_gate, &w->sh_up, &w->sh_down, x, T, out, mw);
	else
		memset(out, 0, sizeof(float) * (size_t)T * H);

	/* Tokens grouped by expert so each expert's weights are read once. */
	memset(count, 0, sizeof(int) * (size_t)E);
	for (int i = 0; i < T * K; i++)
		count[ids[i]]++;
	for (int ex = 0; ex < E; ex++)
		b->eload[(size_t)li * E + ex] += (uint64_t)count[ex];
	int off = 0;
	for (int e = 0; e < E; e++) {
		int n = 0;
		for (int i = 0; i < T * K; i++)
			if (ids[i] == e) {
				rows[off + n] = i / K;
				slot[off + n] = i;
				n++;
			}
		if (n == 0)
			continue;
		for (int r = 0; r < n; r++)
			memcpy(xs + (size_t)r * H, x + (size_t)rows[off + r] * H, sizeof(float) * (size_t)H);
		mlp(&w->exp_gate[e], &w->exp_up[e], &w->exp_down[e], xs, n, ys, mw);
		for (int r = 0; r < n; r++) {
			float *o = out + (size_t)rows[off + r] * H;
			const float *y = ys + (size_t)r * H;
			const float g = wt[slot[off + r]];
			for (int d = 0; d < H; d++)
				o[d] += g * y[d];
		}
		off += n;
	}
	(void)I;
}

static size_t moe_ws(const ds_config *c, int T)
{
	const int E = c->n_routed_experts, K = c->num_experts_per_tok, H = c->hidden_size;
	int I = c->moe_intermediate_size * (c->n_shared_experts > 1 ? c->n_shared_experts : 1);
	return (size_t)T * E + 2 * (size_t)T * K + E + 2 * (size_t)T * K + 2 * (size_t)T * H + 2 * (size_t)T * I + 64;
}

/* One decoder block over x[T][H] in place. */
static void block(ds_backend *b, int li, const step_map *sm, float *x, float *ws)
{
	const ds_config *c = &b->m->cfg;
	const int T = sm->T, H = c->hidden_size;
	float *xn = ws, *y = ws + (size_t)T * H, *rest = y + (size_t)T * H;
	for (int t = 0; t < T; t++)
		ds_cpu_rmsnorm(xn + (size_t)t * H, x + (size_t)t * H, b->lv[li].input_norm, H, c->rms_norm_eps);
	attention(b, li, sm, xn, y, rest);
	for (size_t i = 0; i < (size_t)T * H; i++)
		x[i] += y[i];
	for (int t = 0; t < T; t++)
		ds_cpu_rmsnorm(xn + (size_t)t * H, x + (size_t)t * H, b->lv[li].post_attn_norm, H, c->rms_norm_eps);
	const ds_layer_w *w = &b->m->layers[li];
	if (w->is_moe)
		moe(b, li, T, xn, y, rest);
	else
		mlp(&w->gate_proj, &w->up_proj, &w->down_proj, xn, T, y, rest);
	for (size_t i = 0; i < (size_t)T * H; i++)
		x[i] += y[i];
}

static int forward(ds_backend *b, const ds_batch *bt, ds_step_out *out, ds_err *e)
{
	const ds_model *m = b->m;
	const ds_config *c = &m->cfg;
	const int H = c->hidden_size, V = c->vocab_size;
	int T = 0;
	for (int s = 0; s < bt->n_seqs; s++) {
		if (bt->n_new[s] < 1 || bt->pos0[s] < 0 || bt->logits_from[s] < 0 || bt->logits_from[s] > bt->n_new[s])
			return ds_errf(e, -EINVAL, "cpu backend: bad batch entry %d", s);
		T += bt->n_new[s];
	}
	if (bt->mtp < 0 || bt->mtp > m->n_mtp)
		return ds_errf(e, -EINVAL, "cpu backend: MTP layer %d not in the model (%d)", bt->mtp, m->n_mtp);
	if (bt->n_chain)
		return ds_errf(e, -ENOTSUP, "cpu backend: chained MTP steps run in the engine");
	if (bt->mtp && !bt->hidden_in)
		return ds_errf(e, -EINVAL, "cpu backend: an MTP step needs hidden_in");
	for (int t = 0; t < T; t++)
		if (bt->tokens[t] < 0 || bt->tokens[t] >= V)
			return ds_errf(e, -EINVAL, "cpu backend: token id %d outside the vocabulary (%d)", bt->tokens[t], V);

	int I = c->intermediate_size > c->moe_intermediate_size ? c->intermediate_size : c->moe_intermediate_size;
	size_t need = attention_ws(c, T);
	size_t mw = moe_ws(c, T);
	if (mw > need)
		need = mw;
	if ((size_t)2 * T * I + 64 > need)
		need = (size_t)2 * T * I + 64;
	need += (size_t)4 * T * H + 2 * (size_t)T + (size_t)T * 2 * H;
	float *ws = scratch(b, need);
	if (!ws)
		return ds_errf(e, -ENOMEM, "cpu backend: out of memory for a %d-token step", T);
	omp_set_num_threads(b->threads);

	float *x = ws;                        /* [T][H] residual stream */
	int *seq_of = (int *)(x + (size_t)T * H);
	int *pos = seq_of + T;
	float *rest = (float *)(pos + T);
	step_map sm = { .T = T, .seq_of = seq_of, .pos = pos, .batch = bt };
	for (int s = 0, t = 0; s < bt->n_seqs; s++)
		for (int j = 0; j < bt->n_new[s]; j++, t++) {
			seq_of[t] = s;
			pos[t] = bt->pos0[s] + j;
		}

	int first, last;
	if (!bt->mtp) {
		for (int t = 0; t < T; t++)
			ds_cpu_embed_row(x + (size_t)t * H, m->embed, bt->tokens[t], H);
		first = 0;
		last = m->n_layers;
	} else {
		const int li = m->n_layers + bt->mtp - 1;
		const layer_vecs *v = &b->lv[li];
		float *cat = rest; /* [T][2H]: normed embedding first, then normed hidden */
		for (int t = 0; t < T; t++) {
			float *ct = cat + (size_t)t * 2 * H;
			ds_cpu_embed_row(ct, m->layers[li].mtp_embed, bt->tokens[t], H);
			ds_cpu_rmsnorm(ct, ct, v->enorm, H, c->rms_norm_eps);
			ds_cpu_rmsnorm(ct + H, bt->hidden_in + (size_t)t * H, v->hnorm, H, c->rms_norm_eps);
		}
		ds_cpu_matmul(x, cat, T, &m->layers[li].eh_proj);
		first = li;
		last = li + 1;
	}
	for (int li = first; li < last; li++)
		block(b, li, &sm, x, rest);

	/* Final norm (main model: model.norm; MTP: shared_head.norm), then the head. */
	const float *fn = bt->mtp ? b->lv[m->n_layers + bt->mtp - 1].head_norm : b->final_norm;
	const ds_wmat *head = bt->mtp ? &m->layers[m->n_layers + bt->mtp - 1].head : &m->lm_head;
	float *xn = rest;
	if (bt->mtp && out->hidden)
		memcpy(out->hidden, x, sizeof(float) * (size_t)T * H);
	for (int t = 0; t < T; t++)
		ds_cpu_rmsnorm(xn + (size_t)t * H, x + (size_t)t * H, fn, H, c->rms_norm_eps);
	if (!bt->mtp && out->hidden)
		memcpy(out->hidden, xn, sizeof(float) * (size_t)T * H);
	/* Gather the rows whose logits are wanted, then one matmul. */
	float *sel = xn + (size_t)T * H;
	int rows = 0;
	for (int s = 0, t = 0; s < bt->n_seqs; s++) {
		for (int j = 0; j < bt->n_new[s]; j++, t++)
			if (j >= bt->logits_from[s])
				memcpy(sel + (size_t)rows++ * H, xn + (size_t)t * H, sizeof(float) * (size_t)H);
	}
	if (rows > 0 && out->logits)
		ds_cpu_matmul(out->logits, sel, rows, head);
	for (int r = 0; out->argmax && out->logits && r < rows; r++)
		out->argmax[r] = ds_argmax(out->logits + (size_t)r * V, V);
	return 0;
}

static int kv_copy(ds_backend *b, int32_t dst, int32_t src)
{
	if (dst < 0 || src < 0 || dst >= b->kv_blocks || src >= b->kv_blocks)
		return -EINVAL;
	memcpy(b->kv + (size_t)dst * b->kv_block_stride, b->kv + (size_t)src * b->kv_block_stride,
	       sizeof(float) * b->kv_block_stride);
	return 0;
}

static int expert_load(ds_backend *b, uint64_t *out)
{
	const ds_config *c = &b->m->cfg;
	if (c->n_routed_experts <= 0)
		return -ENOTSUP;
	memcpy(out, b->eload, sizeof(uint64_t) * (size_t)(b->m->n_layers + b->m->n_mtp) * c->n_routed_experts);
	return 0;
}

const ds_backend_ops ds_cpu_backend = {
	.name = "cpu",
	.create = create,
	.destroy = destroy,
	.forward = forward,
	.kv_copy = kv_copy,
	.expert_load = expert_load,
};

#include "model/model.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
	ds_model *m;
	ds_err *e;
	char name[256];
} ctx;

static int is_float_dtype(ds_dtype t)
{
	return t == DS_DT_F32 || t == DS_DT_BF16 || t == DS_DT_F16;
}

static int find(ctx *c, const char *name, int optional, const ds_tensor_ref **out)
{
	ds_tensor_ref *r = ds_weights_find(c->m->weights, name);
	if (!r) {
		*out = NULL;
		return optional ? 0 : ds_errf(c->e, -EINVAL, "%s: missing tensor '%s'", c->m->dir, name);
	}
	r->used = 1;
	*out = r;
	return 0;
}

static int vec(ctx *c, const char *fmt, int layer, int n, int optional, ds_wvec *out)
{
	snprintf(c->name, sizeof(c->name), fmt, layer);
	const ds_tensor_ref *r;
	int rc = find(c, c->name, optional, &r);
	if (rc || !r) {
		*out = NULL;
		return rc;
	}
	if (r->ndim != 1 || r->shape[0] != n || !is_float_dtype(r->dtype))
		return ds_errf(c->e, -EINVAL, "%s: tensor '%s' has shape/dtype %s%s, expected [%d] of a float type",
			       c->m->dir, c->name, ds_dtype_name(r->dtype), r->ndim == 1 ? "[...]" : " (not 1-D)", n);
	*out = r;
	return 0;
}

static int mat_named(ctx *c, int rows, int cols, ds_wmat *out)
{
	const ds_tensor_ref *r;
	int rc = find(c, c->name, 0, &r);
	if (rc)
		return rc;
	if (r->ndim != 2 || r->shape[0] != rows || r->shape[1] != cols)
		return ds_errf(c->e, -EINVAL, "%s: tensor '%s' has shape [%lld, %lld], expected [%d, %d]", c->m->dir,
			       c->name, r->ndim >= 1 ? (long long)r->shape[0] : 0LL,
			       r->ndim >= 2 ? (long long)r->shape[1] : 0LL, rows, cols);
	out->w = r;
	out->rows = rows;
	out->cols = cols;
	out->scale_inv = NULL;
	if (r->dtype == DS_DT_F8_E4M3) {
		char sname[300];
		/* "<x>.weight" -> "<x>.weight_scale_inv" */
		snprintf(sname, sizeof(sname), "%s_scale_inv", c->name);
		const ds_tensor_ref *s;
		if ((rc = find(c, sname, 0, &s)))
			return rc;
		int sr = (rows + 127) / 128, sc = (cols + 127) / 128;
		if (s->ndim != 2 || s->shape[0] != sr || s->shape[1] != sc ||
		    (s->dtype != DS_DT_F32 && s->dtype != DS_DT_BF16))
			return ds_errf(c->e, -EINVAL, "%s: tensor '%s' must be F32 or BF16 of shape [%d, %d] for %s",
				       c->m->dir, sname, sr, sc, c->name);
		out->scale_inv = s;
	} else if (!is_float_dtype(r->dtype)) {
		return ds_errf(c->e, -EINVAL, "%s: tensor '%s' has dtype %s; weights must be F32, F16, BF16 or F8_E4M3",
			       c->m->dir, c->name, ds_dtype_name(r->dtype));
	}
	return 0;
}

static int mat(ctx *c, const char *fmt, int layer, int rows, int cols, ds_wmat *out)
{
	snprintf(c->name, sizeof(c->name), fmt, layer);
	return mat_named(c, rows, cols, out);
}

#define P "model.layers.%d."

static int load_layer(ctx *c, int L, ds_layer_w *lw)
{
	const ds_config *k = &c->m->cfg;
	int H = k->hidden_size, nh = k->num_attention_heads;
	int qk = ds_config_qk_head_dim(k);
	int rc;
	lw->index = L;
	lw->is_mtp = L >= k->num_hidden_layers;
	lw->is_moe = ds_config_is_moe_layer(k, L);
	if ((rc = vec(c, P "input_layernorm.weight", L, H, 0, &lw->input_norm)) ||
	    (rc = vec(c, P "post_attention_layernorm.weight", L, H, 0, &lw->post_attn_norm)))
		return rc;
	if (k->q_lora_rank > 0) {
		if ((rc = mat(c, P "self_attn.q_a_proj.weight", L, k->q_lora_rank, H, &lw->q_a_proj)) ||
		    (rc = vec(c, P "self_attn.q_a_layernorm.weight", L, k->q_lora_rank, 0, &lw->q_a_norm)) ||
		    (rc = mat(c, P "self_attn.q_b_proj.weight", L, nh * qk, k->q_lora_rank, &lw->q_b_proj)))
			return rc;
	} else if ((rc = mat(c, P "self_attn.q_proj.weight", L, nh * qk, H, &lw->q_proj))) {
		return rc;
	}
	if ((rc = mat(c, P "self_attn.kv_a_proj_with_mqa.weight", L, k->kv_lora_rank + k->qk_rope_head_dim, H,
		      &lw->kv_a_proj)) ||
	    (rc = vec(c, P "self_attn.kv_a_layernorm.weight", L, k->kv_lora_rank, 0, &lw->kv_a_norm)) ||
	    (rc = mat(c, P "self_attn.kv_b_proj.weight", L, nh * (k->qk_nope_head_dim + k->v_head_dim),
		      k->kv_lora_rank, &lw->kv_b_proj)) ||
	    (rc = mat(c, P "self_attn.o_proj.weight", L, H, nh * k->v_head_dim, &lw->o_proj)))
		return rc;
	if (!lw->is_moe) {
		int I = k->intermediate_size;
		if ((rc = mat(c, P "mlp.gate_proj.weight", L, I, H, &lw->gate_proj)) ||
		    (rc = mat(c, P "mlp.up_proj.weight", L, I, H, &lw->up_proj)) ||
		    (rc = mat(c, P "mlp.down_proj.weight", L, H, I, &lw->down_proj)))
			return rc;
	} else {
		int E = k->n_routed_experts, I = k->moe_intermediate_size;
		if ((rc = mat(c, P "mlp.gate.weight", L, E, H, &lw->router)))
			return rc;
		if ((rc = vec(c, P "mlp.gate.e_score_correction_bias", L, E, k->topk_method != DS_TOPK_NOAUX_TC,
			      &lw->router_bias)))
			return rc;
		lw->exp_gate = calloc((size_t)E * 3, sizeof(ds_wmat));
		if (!lw->exp_gate)
			return -ENOMEM;
		lw->exp_up = lw->exp_gate + E;
		lw->exp_down = lw->exp_gate + 2 * E;
		for (int x = 0; x < E; x++) {
			snprintf(c->name, sizeof(c->name), P "mlp.experts.%d.gate_proj.weight", L, x);
			if ((rc = mat_named(c, I, H, &lw->exp_gate[x])))
				return rc;
			snprintf(c->name, sizeof(c->name), P "mlp.experts.%d.up_proj.weight", L, x);
			if ((rc = mat_named(c, I, H, &lw->exp_up[x])))
				return rc;
			snprintf(c->name, sizeof(c->name), P "mlp.experts.%d.down_proj.weight", L, x);
			if ((rc = mat_named(c, H, I, &lw->exp_down[x])))
				return rc;
		}
		if (k->n_shared_experts > 0) {
			int S = I * k->n_shared_experts;
			if ((rc = mat(c, P "mlp.shared_experts.gate_proj.weight", L, S, H, &lw->sh_gate)) ||
			    (rc = mat(c, P "mlp.shared_experts.up_proj.weight", L, S, H, &lw->sh_up)) ||
			    (rc = mat(c, P "mlp.shared_experts.down_proj.weight", L, H, S, &lw->sh_down)))
				return rc;
		}
	}
	if (lw->is_mtp) {
		if ((rc = vec(c, P "enorm.weight", L, H, 0, &lw->enorm)) ||
		    (rc = vec(c, P "hnorm.weight", L, H, 0, &lw->hnorm)) ||
		    (rc = mat(c, P "eh_proj.weight", L, H, 2 * H, &lw->eh_proj)) ||
		    (rc = vec(c, P "shared_head.norm.weight", L, H, 0, &lw->head_norm)) ||
		    (rc = mat(c, P "shared_head.head.weight", L, k->vocab_size, H, &lw->head)))
			return rc;
		/* Some exports drop the MTP copy of the embedding; the main one is identical. */
		snprintf(c->name, sizeof(c->name), P "embed_tokens.weight", L);
		if ((rc = find(c, c->name, 1, &lw->mtp_embed)))
			return rc;
		if (!lw->mtp_embed)
			lw->mtp_embed = c->m->embed;
		else if (lw->mtp_embed->ndim != 2 || lw->mtp_embed->shape[0] != k->vocab_size ||
			 lw->mtp_embed->shape[1] != H || !is_float_dtype(lw->mtp_embed->dtype))
			return ds_errf(c->e, -EINVAL, "%s: tensor '%s' must be [%d, %d] of a float type", c->m->dir,
				       c->name, k->vocab_size, H);
	}
	return 0;
}

#undef P

ds_model *ds_model_free(ds_model *m)
{
	if (!m)
		return NULL;
	if (m->layers)
		for (int i = 0; i < m->n_layers + m->n_mtp; i++)
			free(m->layers[i].exp_gate);
	free(m->layers);
	ds_weights_free(m->weights);
	free(m->dir);
	free(m);
	return NULL;
}

int ds_model_open(const char *dir, unsigned flags, ds_model **out, ds_err *e)
{
	ds_model *m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	int rc;
	m->dir = strdup(dir);
	if (!m->dir) {
		rc = -ENOMEM;
		goto fail;
	}
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/config.json", dir);
	if ((rc = ds_config_load(path, &m->cfg, e)))
		goto fail;
	if ((rc = ds_weights_open(dir, (flags & DS_MODEL_NO_MAP) ? DS_WEIGHTS_NO_MAP : 0, &m->weights, e)))
		goto fail;
	ds_dtype_init();
	ctx c = { .m = m, .e = e };
	const ds_config *k = &m->cfg;
	const ds_tensor_ref *r;
	if ((rc = find(&c, "model.embed_tokens.weight", 0, &m->embed)))
		goto fail;
	r = m->embed;
	if (r->ndim != 2 || r->shape[0] != k->vocab_size || r->shape[1] != k->hidden_size || !is_float_dtype(r->dtype)) {
		rc = ds_errf(e, -EINVAL, "%s: tensor 'model.embed_tokens.weight' must be [%d, %d] of a float type", dir,
			     k->vocab_size, k->hidden_size);
		goto fail;
	}
	if ((rc = vec(&c, "model.norm.weight%.0d", 0, k->hidden_size, 0, &m->final_norm)))
		goto fail;
	if (k->tie_word_embeddings && !ds_weights_find(m->weights, "lm_head.weight")) {
		m->lm_head = (ds_wmat){ .w = m->embed, .rows = k->vocab_size, .cols = k->hidden_size };
	} else if ((rc = mat(&c, "lm_head.weight%.0d", 0, k->vocab_size, k->hidden_size, &m->lm_head))) {
		goto fail;
	}
	m->n_layers = k->num_hidden_layers;
	if (!(flags & DS_MODEL_NO_MTP)) {
		for (int i = 0; i < k->num_nextn_predict_layers; i++) {
			snprintf(path, sizeof(path), "model.layers.%d.eh_proj.weight", m->n_layers + i);
			if (!ds_weights_find(m->weights, path))
				break;
			m->n_mtp++;
		}
	}
	m->layers = calloc((size_t)(m->n_layers + m->n_mtp), sizeof(ds_layer_w));
	if (!m->layers) {
		rc = -ENOMEM;
		goto fail;
	}
	for (int L = 0; L < m->n_layers + m->n_mtp; L++)
		if ((rc = load_layer(&c, L, &m->layers[L])))
			goto fail;
	for (size_t i = 0; i < ds_weights_count(m->weights); i++)
		if (!ds_weights_at(m->weights, i)->used)
			m->n_unused++;
	*out = m;
	return 0;
fail:
	ds_model_free(m);
	return rc;
}

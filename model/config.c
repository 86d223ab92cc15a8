#include "model/config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A key is read as an integer within [lo, hi]; absent keys keep the default.
 * Errors name the file and the key with the allowed range. */
static int get_int(const cJSON *o, const char *key, int *dst, int required, long lo, long hi,
		   const char *path, ds_err *e)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	if (!v || cJSON_IsNull(v)) {
		if (required)
			return ds_errf(e, -EINVAL, "%s: missing required key \"%s\"", path, key);
		return 0;
	}
	if (cJSON_IsBool(v)) {
		*dst = cJSON_IsTrue(v);
		return 0;
	}
	if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < lo ||
	    v->valuedouble > hi)
		return ds_errf(e, -EINVAL, "%s: \"%s\" must be an integer in [%ld, %ld]", path, key, lo, hi);
	*dst = (int)v->valuedouble;
	return 0;
}

static int get_num(const cJSON *o, const char *key, double *dst, double lo, double hi, const char *path,
		   ds_err *e)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	if (!v || cJSON_IsNull(v))
		return 0;
	if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi))
		return ds_errf(e, -EINVAL, "%s: \"%s\" must be a number in [%g, %g]", path, key, lo, hi);
	*dst = v->valuedouble;
	return 0;
}

static const char *get_str(const cJSON *o, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int parse_rope(const cJSON *rs, const char *path, ds_config *c, ds_err *e)
{
	const char *type = get_str(rs, "type");
	if (!type)
		type = get_str(rs, "rope_type");
	int rc = get_num(rs, "rope_theta", &c->rope_theta, 1, 1e12, path, e);
	if (rc)
		return rc;
	if (!type || !strcmp(type, "default"))
		return 0;
	if (strcmp(type, "yarn"))
		return ds_errf(e, -EINVAL, "%s: rope scaling type \"%s\" is not supported (default, yarn)", path, type);
	c->rope.type = DS_ROPE_YARN;
	c->rope.factor = 1;
	c->rope.beta_fast = 32;
	c->rope.beta_slow = 1;
	c->rope.mscale = 1;
	c->rope.mscale_all_dim = 0;
	c->rope.original_max_position_embeddings = c->max_position_embeddings;
	if ((rc = get_num(rs, "factor", &c->rope.factor, 1e-3, 1e6, path, e)) ||
	    (rc = get_num(rs, "beta_fast", &c->rope.beta_fast, 1e-6, 1e6, path, e)) ||
	    (rc = get_num(rs, "beta_slow", &c->rope.beta_slow, 1e-6, 1e6, path, e)) ||
	    (rc = get_num(rs, "mscale", &c->rope.mscale, 0, 1e3, path, e)) ||
	    (rc = get_num(rs, "mscale_all_dim", &c->rope.mscale_all_dim, 0, 1e3, path, e)) ||
	    (rc = get_int(rs, "original_max_position_embeddings", &c->rope.original_max_position_embeddings, 0,
			  1, 1 << 30, path, e)))
		return rc;
	return 0;
}

int ds_config_parse(const char *json, size_t len, const char *path, ds_config *c, ds_err *e)
{
	memset(c, 0, sizeof(*c));
	cJSON *o = cJSON_ParseWithLength(json, len);
	if (!o || !cJSON_IsObject(o)) {
		cJSON_Delete(o);
		return ds_errf(e, -EINVAL, "%s: not a JSON object", path);
	}
	/* Defaults of DeepSeek-V3's configuration class where a key is optional. */
	c->rms_norm_eps = 1e-6f;
	c->rope_theta = 10000;
	c->routed_scaling_factor = 1;
	c->n_group = 1;
	c->topk_group = 1;
	c->moe_layer_freq = 1;
	c->max_position_embeddings = 4096;
	c->bos_token_id = -1;
	c->eos_token_id = -1;
	c->weight_block[0] = c->weight_block[1] = 128;
	const char *mt = get_str(o, "model_type");
	int is_v3 = mt && !strcmp(mt, "deepseek_v3");
	c->scoring_func = is_v3 ? DS_SCORE_SIGMOID : DS_SCORE_SOFTMAX;
	c->topk_method = is_v3 ? DS_TOPK_NOAUX_TC : DS_TOPK_GREEDY;
	c->norm_topk_prob = is_v3;
	double eps = c->rms_norm_eps, rsf = c->routed_scaling_factor;
	int rc;
	const int big = 1 << 24;
	if ((rc = get_int(o, "vocab_size", &c->vocab_size, 1, 1, big, path, e)) ||
	    (rc = get_int(o, "hidden_size", &c->hidden_size, 1, 1, 1 << 16, path, e)) ||
	    (rc = get_int(o, "intermediate_size", &c->intermediate_size, 1, 1, 1 << 20, path, e)) ||
	    (rc = get_int(o, "moe_intermediate_size", &c->moe_intermediate_size, 0, 1, 1 << 20, path, e)) ||
	    (rc = get_int(o, "num_hidden_layers", &c->num_hidden_layers, 1, 1, 1024, path, e)) ||
	    (rc = get_int(o, "num_nextn_predict_layers", &c->num_nextn_predict_layers, 0, 0, 16, path, e)) ||
	    (rc = get_int(o, "num_attention_heads", &c->num_attention_heads, 1, 1, 1024, path, e)) ||
	    (rc = get_int(o, "n_shared_experts", &c->n_shared_experts, 0, 0, 64, path, e)) ||
	    (rc = get_int(o, "n_routed_experts", &c->n_routed_experts, 0, 0, 4096, path, e)) ||
	    (rc = get_int(o, "num_experts_per_tok", &c->num_experts_per_tok, 0, 0, 4096, path, e)) ||
	    (rc = get_int(o, "first_k_dense_replace", &c->first_k_dense_replace, 0, 0, 1024, path, e)) ||
	    (rc = get_int(o, "moe_layer_freq", &c->moe_layer_freq, 0, 1, 1024, path, e)) ||
	    (rc = get_int(o, "n_group", &c->n_group, 0, 1, 4096, path, e)) ||
	    (rc = get_int(o, "topk_group", &c->topk_group, 0, 1, 4096, path, e)) ||
	    (rc = get_int(o, "norm_topk_prob", &c->norm_topk_prob, 0, 0, 1, path, e)) ||
	    (rc = get_int(o, "q_lora_rank", &c->q_lora_rank, 0, 0, 1 << 16, path, e)) ||
	    (rc = get_int(o, "kv_lora_rank", &c->kv_lora_rank, 1, 1, 1 << 16, path, e)) ||
	    (rc = get_int(o, "qk_nope_head_dim", &c->qk_nope_head_dim, 1, 0, 4096, path, e)) ||
	    (rc = get_int(o, "qk_rope_head_dim", &c->qk_rope_head_dim, 1, 2, 1024, path, e)) ||
	    (rc = get_int(o, "v_head_dim", &c->v_head_dim, 1, 1, 4096, path, e)) ||
	    (rc = get_int(o, "max_position_embeddings", &c->max_position_embeddings, 0, 1, 1 << 30, path, e)) ||
	    (rc = get_int(o, "tie_word_embeddings", &c->tie_word_embeddings, 0, 0, 1, path, e)) ||
	    (rc = get_int(o, "bos_token_id", &c->bos_token_id, 0, 0, big, path, e)) ||
	    (rc = get_int(o, "eos_token_id", &c->eos_token_id, 0, 0, big, path, e)) ||
	    (rc = get_num(o, "rms_norm_eps", &eps, 1e-12, 1, path, e)) ||
	    (rc = get_num(o, "routed_scaling_factor", &rsf, 1e-6, 1e6, path, e)) ||
	    (rc = get_num(o, "rope_theta", &c->rope_theta, 1, 1e12, path, e)))
		goto out;
	c->rms_norm_eps = (float)eps;
	c->routed_scaling_factor = (float)rsf;
	const char *sf = get_str(o, "scoring_func");
	if (sf) {
		if (!strcmp(sf, "softmax"))
			c->scoring_func = DS_SCORE_SOFTMAX;
		else if (!strcmp(sf, "sigmoid"))
			c->scoring_func = DS_SCORE_SIGMOID;
		else {
			rc = ds_errf(e, -EINVAL, "%s: \"scoring_func\" must be softmax or sigmoid", path);
			goto out;
		}
	}
	const char *tm = get_str(o, "topk_method");
	if (tm) {
		if (!strcmp(tm, "greedy"))
			c->topk_method = DS_TOPK_GREEDY;
		else if (!strcmp(tm, "group_limited_greedy"))
			c->topk_method = DS_TOPK_GROUP_LIMITED;
		else if (!strcmp(tm, "noaux_tc"))
			c->topk_method = DS_TOPK_NOAUX_TC;
		else {
			rc = ds_errf(e, -EINVAL, "%s: \"topk_method\" must be greedy, group_limited_greedy or noaux_tc",
				     path);
			goto out;
		}
	}
	/* Official configs say rope_scaling; transformers 5 writes rope_parameters
	 * (which also carries rope_theta). */
	const cJSON *rs = cJSON_GetObjectItemCaseSensitive(o, "rope_scaling");
	if (!cJSON_IsObject(rs))
		rs = cJSON_GetObjectItemCaseSensitive(o, "rope_parameters");
	if (cJSON_IsObject(rs) && (rc = parse_rope(rs, path, c, e)))
		goto out;
	const cJSON *q = cJSON_GetObjectItemCaseSensitive(o, "quantization_config");
	if (cJSON_IsObject(q)) {
		const char *qm = get_str(q, "quant_method");
		if (!qm || strcmp(qm, "fp8")) {
			rc = ds_errf(e, -EINVAL, "%s: quantization_config: only quant_method \"fp8\" is supported", path);
			goto out;
		}
		const char *fmt = get_str(q, "fmt");
		if (fmt && strcmp(fmt, "e4m3")) {
			rc = ds_errf(e, -EINVAL, "%s: quantization_config: fmt \"%s\" (only e4m3)", path, fmt);
			goto out;
		}
		const cJSON *bs = cJSON_GetObjectItemCaseSensitive(q, "weight_block_size");
		if (bs) {
			if (!cJSON_IsArray(bs) || cJSON_GetArraySize(bs) != 2 ||
			    !cJSON_IsNumber(cJSON_GetArrayItem(bs, 0)) || !cJSON_IsNumber(cJSON_GetArrayItem(bs, 1)) ||
			    cJSON_GetArrayItem(bs, 0)->valuedouble != 128 || cJSON_GetArrayItem(bs, 1)->valuedouble != 128) {
				rc = ds_errf(e, -EINVAL, "%s: quantization_config: weight_block_size must be [128, 128]", path);
				goto out;
			}
		}
		c->fp8 = 1;
	}
	/* Cross-field checks. */
	if (c->n_routed_experts > 0) {
		if (c->moe_intermediate_size <= 0 || c->num_experts_per_tok <= 0 ||
		    c->num_experts_per_tok > c->n_routed_experts) {
			rc = ds_errf(e, -EINVAL,
				     "%s: MoE needs moe_intermediate_size > 0 and 1 <= num_experts_per_tok <= n_routed_experts (%d)",
				     path, c->n_routed_experts);
			goto out;
		}
		if (c->n_group < 1 || c->n_routed_experts % c->n_group || c->topk_group < 1 ||
		    c->topk_group > c->n_group) {
			rc = ds_errf(e, -EINVAL, "%s: n_group (%d) must divide n_routed_experts (%d) and 1 <= topk_group <= n_group",
				     path, c->n_group, c->n_routed_experts);
			goto out;
		}
		if (c->topk_method == DS_TOPK_NOAUX_TC && c->n_routed_experts / c->n_group < 2) {
			rc = ds_errf(e, -EINVAL, "%s: noaux_tc needs at least 2 experts per group", path);
			goto out;
		}
		if (c->topk_method != DS_TOPK_GREEDY &&
		    c->num_experts_per_tok > c->topk_group * (c->n_routed_experts / c->n_group)) {
			rc = ds_errf(e, -EINVAL, "%s: num_experts_per_tok exceeds the experts of topk_group groups", path);
			goto out;
		}
	}
	if (c->qk_rope_head_dim % 2) {
		rc = ds_errf(e, -EINVAL, "%s: qk_rope_head_dim must be even", path);
		goto out;
	}
	if (c->bos_token_id >= c->vocab_size || c->eos_token_id >= c->vocab_size) {
		rc = ds_errf(e, -EINVAL, "%s: bos/eos token id outside the vocabulary (%d)", path, c->vocab_size);
		goto out;
	}
	rc = 0;
out:
	cJSON_Delete(o);
	return rc;
}

int ds_config_load(const char *path, ds_config *out, ds_err *e)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return ds_errf(e, -errno, "%s: %s", path, strerror(errno));
	char *buf = NULL;
	size_t len = 0, cap = 0;
	for (;;) {
		if (len + 4096 > cap) {
			cap = cap ? cap * 2 : 16384;
			if (cap > (16u << 20)) {
				free(buf);
				fclose(f);
				return ds_errf(e, -EFBIG, "%s: larger than 16 MiB", path);
			}
			char *nb = realloc(buf, cap);
			if (!nb) {
				free(buf);
				fclose(f);
				return -ENOMEM;
			}
			buf = nb;
		}
		size_t r = fread(buf + len, 1, cap - len, f);
		len += r;
		if (r == 0)
			break;
	}
	fclose(f);
	int rc = ds_config_parse(buf, len, path, out, e);
	free(buf);
	return rc;
}

static double yarn_get_mscale(double scale, double mscale)
{
	return scale <= 1 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

double ds_config_softmax_scale(const ds_config *c)
{
	double s = 1.0 / sqrt((double)ds_config_qk_head_dim(c));
	if (c->rope.type == DS_ROPE_YARN && c->rope.mscale_all_dim != 0) {
		double m = yarn_get_mscale(c->rope.factor, c->rope.mscale_all_dim);
		s *= m * m;
	}
	return s;
}

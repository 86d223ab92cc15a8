/* config.h — a model's config.json (DeepSeek-V2/V3 keys, including the
 * transformers-5 spelling rope_parameters) parsed and range-checked into a
 * plain struct. Pure; any thread. */
#ifndef DS_CONFIG_H
#define DS_CONFIG_H

#include <stddef.h>

#include "model/err.h"

typedef enum { DS_SCORE_SOFTMAX = 0, DS_SCORE_SIGMOID = 1 } ds_scoring;
typedef enum {
	DS_TOPK_GREEDY = 0,       /* V2: plain top-k of the scores */
	DS_TOPK_GROUP_LIMITED = 1,/* V2.5: group max, top groups, top-k inside */
	DS_TOPK_NOAUX_TC = 2,     /* V3: scores + bias, group sum of top-2, top groups */
} ds_topk_method;
typedef enum { DS_ROPE_DEFAULT = 0, DS_ROPE_YARN = 1 } ds_rope_type;

typedef struct ds_config {
	int vocab_size;
	int hidden_size;
	int intermediate_size;
	int moe_intermediate_size;
	int num_hidden_layers;
	int num_nextn_predict_layers;
	int num_attention_heads;
	int n_shared_experts;
	int n_routed_experts;   /* 0: no MoE at all */
	int num_experts_per_tok;
	int first_k_dense_replace;
	int moe_layer_freq;
	int n_group, topk_group;
	float routed_scaling_factor;
	int norm_topk_prob;
	ds_scoring scoring_func;
	ds_topk_method topk_method;
	int q_lora_rank;        /* 0 when null: q_proj is used */
	int kv_lora_rank;
	int qk_nope_head_dim, qk_rope_head_dim, v_head_dim;
	float rms_norm_eps;
	double rope_theta;
	int max_position_embeddings;
	int tie_word_embeddings;
	int bos_token_id, eos_token_id; /* -1 when absent */
	struct {
		ds_rope_type type;
		double factor;
		int original_max_position_embeddings;
		double beta_fast, beta_slow, mscale, mscale_all_dim;
	} rope;
	/* quantization_config: fp8 with block scales */
	int fp8;
	int weight_block[2];
} ds_config;

/* Parses JSON text; path is for messages only. */
int ds_config_parse(const char *json, size_t len, const char *path, ds_config *out, ds_err *e);
int ds_config_load(const char *path, ds_config *out, ds_err *e);

/* Derived quantities. */
static inline int ds_config_qk_head_dim(const ds_config *c) { return c->qk_nope_head_dim + c->qk_rope_head_dim; }
static inline int ds_config_is_moe_layer(const ds_config *c, int layer)
{
	return c->n_routed_experts > 0 && layer >= c->first_k_dense_replace &&
	       layer % (c->moe_layer_freq > 0 ? c->moe_layer_freq : 1) == 0;
}
/* Softmax scale with YaRN's mscale correction: q·k / sqrt(d) * mscale². */
double ds_config_softmax_scale(const ds_config *c);
/* Floats cached per token and layer: kv_lora_rank + qk_rope_head_dim. */
static inline int ds_config_kv_dim(const ds_config *c) { return c->kv_lora_rank + c->qk_rope_head_dim; }

#endif

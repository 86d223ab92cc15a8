/* model.h — a DeepSeek-V2/V3 model directory opened and validated: config,
 * weights, and every tensor the forward pass needs resolved per layer with
 * its shape checked. The MTP layers (index >= num_hidden_layers) resolve too.
 * Owns its ds_weights. Read-only after open; any thread may read it. */
#ifndef DS_MODEL_H
#define DS_MODEL_H

#include "model/config.h"
#include "model/weights.h"

/* A 2-D weight W[rows=out][cols=in], possibly FP8 with scale_inv of shape
 * [ceil(rows/128)][ceil(cols/128)] (float32 or bf16). */
typedef struct ds_wmat {
	const ds_tensor_ref *w;
	const ds_tensor_ref *scale_inv; /* NULL unless w is F8_E4M3 */
	int rows, cols;
} ds_wmat;

/* A 1-D vector (norm weights, biases). */
typedef const ds_tensor_ref *ds_wvec;

typedef struct ds_layer_w {
	int index;
	int is_moe;
	int is_mtp;
	ds_wvec input_norm, post_attn_norm;
	/* attention */
	ds_wmat q_proj;                 /* when q_lora_rank == 0 */
	ds_wmat q_a_proj, q_b_proj;     /* when q_lora_rank > 0 */
	ds_wvec q_a_norm;
	ds_wmat kv_a_proj;              /* [kv_lora + rope][hidden] */
	ds_wvec kv_a_norm;
	ds_wmat kv_b_proj;              /* [heads*(nope+v)][kv_lora] */
	ds_wmat o_proj;                 /* [hidden][heads*v] */
	/* dense MLP or shared experts */
	ds_wmat gate_proj, up_proj, down_proj;
	/* MoE */
	ds_wmat router;                 /* mlp.gate.weight [n_routed][hidden] */
	ds_wvec router_bias;            /* e_score_correction_bias or NULL */
	ds_wmat *exp_gate, *exp_up, *exp_down; /* [n_routed] */
	ds_wmat sh_gate, sh_up, sh_down; /* shared experts (rows = n_shared * moe_inter) */
	/* MTP only */
	ds_wvec enorm, hnorm, head_norm;
	ds_wmat eh_proj;                /* [hidden][2*hidden] */
	ds_wmat head;                   /* shared_head.head [vocab][hidden] */
	const ds_tensor_ref *mtp_embed; /* embed_tokens of the MTP layer */
} ds_layer_w;

typedef struct ds_model {
	char *dir;
	ds_config cfg;
	ds_weights *weights;
	const ds_tensor_ref *embed; /* [vocab][hidden] */
	ds_wvec final_norm;
	ds_wmat lm_head;
	int n_layers;    /* num_hidden_layers */
	int n_mtp;       /* MTP layers present in the weights (<= num_nextn_predict_layers) */
	ds_layer_w *layers; /* n_layers + n_mtp */
	int n_unused;    /* tensors in the files the model does not use */
} ds_model;

enum { DS_MODEL_NO_MAP = 1, /* index only: for streaming loaders */
       DS_MODEL_NO_MTP = 2 /* ignore MTP layers even when present */ };

int ds_model_open(const char *dir, unsigned flags, ds_model **out, ds_err *e);
ds_model *ds_model_free(ds_model *m);

#endif

/* cuda_internal.h — the CUDA backend's state, shared by cuda_backend.c
 * (weights, workspace, steps, graphs: the ds_backend_ops) and cuda_layer.c
 * (one decoder layer's launches). Not a public interface: one thread drives
 * a backend, and everything here is that thread's. */
#ifndef DS_CUDA_INTERNAL_H
#define DS_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "kernels/cuda_backend.h"
#include "kernels/gemm.h"
#include "kernels/graph.h"
#include "kernels/rope.h"
#include "kernels/sample.h"
#include "model/backend.h"
#include "model/wload_cuda.h"

typedef struct {
	dsk_weight q_proj, q_a, q_b, kv_a, o_proj, gate, up, down, router, sh_gate, sh_up, sh_down, eh_proj, head;
	dsk_weight *eg, *eu, *ed;
	float *input_norm, *post_norm, *q_a_norm, *kv_a_norm, *router_bias, *enorm, *hnorm, *head_norm;
	dsk_bf16 *kvb;     /* kv_b_proj in bf16 [nh*(nope+v)][kvl] */
	/* Device arrays of the experts' gate/up/down weights and scales, for
	 * the grouped GEMV; dev_moe when every expert takes that path. */
	const void **ew[3];
	const float **es[3];
	int esld[3], dev_moe, moe_fp8, moe_fp8_down;
	dsk_bf16 *mtp_embed;
} dlayer;

struct ds_backend {
	const ds_model *m;
	int dev, sms;
	cudaStream_t s;
	cublasHandle_t blas;
	dsk_gemm *gemm;
	/* The shared experts run beside the routed ones, on s2 with their own
	 * GEMM scratch; fork/join by events (captured into graphs alike). */
	cudaStream_t s2;
	dsk_gemm *gemm2;
	cudaEvent_t ev_fork, ev_join;
	void **allocs;
	int n_allocs, cap_allocs;
	size_t weight_bytes;
	int fallbacks;
	/* Raw weight bytes streamed by io_uring (model/wload.h) into one device
	 * arena; matrices used as stored point into it. NULL: mmap + upload. */
	ds_wload_cuda *wl;
	const ds_tensor_ref *ref0;
	unsigned long long *eload; /* [layers incl. MTP][E] tokens routed to each expert */
	dlayer *L;
	dsk_bf16 *embed;
	float *final_norm, *inv_freq;
	dsk_weight lm_head;
	float attn_factor, softmax_scale;
	int kv_blocks, block_tokens;
	dsk_bf16 *kv;
	size_t kv_layer_stride, kv_block_stride; /* elements */
	/* step workspace, sized for cap_T tokens */
	int cap_T, cap_seqs, cap_mb;
	char *ws;
	float *x, *y, *q, *qa, *kvx, *qabs, *g, *u, *logits_r, *moe_w, *gp, *up, *yp, *ysh, *attn_ws, *of, *hin;
	dsk_bf16 *xn, *qan, *qb, *lat, *o, *h, *xp, *hp, *sel;
	int32_t *tok, *pos, *seq, *tables, *ids, *cnt, *off, *ppos, *row_tok, *sel_idx;
	int32_t *alist;  /* tokens the split-KV kernel attends for */
	int32_t *act;    /* experts with rows in this layer's plan */
	int32_t *chn;    /* [2][cap_seqs]: chained drafting's rows and positions (kernels/chain.h) */
	/* Long prefill chunks go through the flash kernel where it takes the
	 * head shapes (flash; DS_CUDA_FLASH=0 turns it off), else GEMM
	 * attention (see attention()). */
	struct pf_seq {
		int s, t0, n, p0;
	} *pf;
	int n_pf, n_short, flash;
	int moe_gemm; /* grouped expert GEMMs for large steps (DS_CUDA_MOE_GEMM=0: off) */
	int moe_gemm_min_rows; /* and for device-planned steps of at least this many rows an
				* expert on average (12; DS_CUDA_MOE_GEMM_MIN_ROWS) */
	int moe_gemm_fp8_dev;  /* FP8 experts too there (DS_CUDA_MOE_GEMM_FP8_DEV=1; slower) */
	int moe_host_plan;     /* steps over dev_moe_max_t tokens plan on the host
				* (DS_CUDA_MOE_HOST_PLAN=1; else the grouped GEMMs on the
				* device plan where they take the layer) */
	void *pf_buf;
	size_t pf_cap;
	uint8_t *qx;     /* quantized MoE activations (device MoE path) */
	float *qxs;
	/* The norms' FP8 copy of xn (or qan) for FP8 weights at decode sizes
	 * (dsk_qout): xn_q says whether the last write of xn made one. */
	uint8_t *qn;
	float *qns;
	int preq, xn_q;
	int moe_rows;
	size_t attn_ws_n;
	int dev_moe_max_t; /* steps up to this many tokens skip the host round trip */
	int prof;        /* synchronize and time each phase of a step */
	double prof_t[DS_CUDA_PHASES], prof_last;
	float *lg;       /* logit rows of a step */
	int32_t *amax;   /* their argmax or drawn token */
	dsk_draw *drawp; /* per row: how to draw (temperature 0: argmax) */
	dsk_draw *h_draw;
	size_t lg_cap;
	dsk_graphs *graphs; /* decode steps as CUDA graphs (NULL: off) */
	unsigned gemm_gen;
	int32_t *h_i32;  /* pinned host staging */
	float *h_f32;
	size_t h_cap;
};

#define TRY(call)                  \
	do {                       \
		if ((rc = (call))) \
			return rc; \
	} while (0)

/* The norm after a block: the next block's input norm, or the final one
 * (which also keeps float rows in of). */
struct next_norm {
	const float *w;
	float *of;
};

/* Profiling only: charges the time since the last mark to a phase
 * (synchronizes the stream). */
void ds_cuda_mark(ds_backend *b, int phase);
/* A CUDA error as -ENOMEM or -EIO with its text in e. */
int ds_cuda_cerr(ds_err *e, cudaError_t err, const char *what);
/* out[M][ldo] (float) = x[M][K] W^T on the backend's main GEMM handle. */
int ds_cuda_gemm(ds_backend *b, float *out, int ldo, const dsk_bf16 *x, int M, const dsk_weight *W, ds_err *e);
/* x += y (if y), then the hidden size's RMSNorm with weights w into xn
 * (and of, and xn's FP8 copy where its readers want one). */
int ds_cuda_norm_xn(ds_backend *b, float *x, const float *y, const float *w, int T, float *of, ds_err *e);
/* Decoder layer li from the normed input in xn to the normed input of what
 * follows (nn) in xn; x carries the residual stream. */
int ds_cuda_block(ds_backend *b, int li, int T, int max_len, const dsk_kv_geom *geo, const struct next_norm *nn,
		  ds_err *e);

#endif

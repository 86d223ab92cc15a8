/* cuda_backend.c — the engine's backend ops on one GPU (ds_cuda_backend).
 * Weights are made resident at create (bf16, or FP8 with their 128x128 scales
 * when cuBLASLt's block-scaled mode takes the shape; otherwise dequantized to
 * bf16, counted in ds_cuda_backend_fallbacks). The KV pool is bf16 with the
 * CPU backend's layout [block][layer][slot][kv_lora_rank + rope]. Activations:
 * float32 residual stream, bf16 GEMM inputs. One thread drives a backend. */
#include <cuda_runtime_api.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/attn.h"
#include "kernels/chain.h"
#include "kernels/cuda_backend.h"
#include "kernels/cuda_internal.h"
#include "kernels/flash.h"
#include "kernels/gemm.h"
#include "kernels/gemv.h"
#include "kernels/graph.h"
#include "kernels/norm.h"
#include "kernels/rope.h"
#include "kernels/sample.h"
#include "model/backend.h"
#include "model/cpu_ops.h"
#include "model/wload.h"
#include "model/wload_cuda.h"

#include <cublas_v2.h>

/* Sequences with at least this many new tokens in a step (and at most 8192
 * positions) take the GEMM attention path. */
#define PF_MIN_TOKENS 64
#define BLAS_WS_BYTES (32u << 20)
/* Steps of up to this many tokens run the routed experts as grouped GEMVs
 * (or, with enough rows an expert, grouped GEMMs) planned on the device and
 * can become graphs; larger ones run the grouped GEMMs on the device plan
 * too where the layer takes them (cuda_layer.c moe()), else plan on the
 * host. The GEMV/GEMM crossover on 4-layer V2-Lite shapes (H100, prefill
 * of P tokens, docs/PERFORMANCE.md): bf16 ~1024, FP8 ~2048. */
#define DEV_MOE_MAX_T 1024
/* Decode shapes kept as graphs: token counts x rounded lengths in use. */
#define GRAPHS_KEPT 128


int ds_cuda_backend_fallbacks(const ds_backend *b) { return b->fallbacks; }

static const char *phase_names[DS_CUDA_PHASES] = { "embed+io", "attn proj", "attention", "attn out", "moe route",
						   "experts", "shared+mlp", "head" };

void ds_cuda_backend_set_profile(ds_backend *b, int on)
{
	b->prof = on;
	memset(b->prof_t, 0, sizeof(b->prof_t));
}

const char *ds_cuda_backend_profile(const ds_backend *b, int phase, double *seconds)
{
	*seconds = b->prof_t[phase];
	return phase_names[phase];
}

static double wall(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Profiling only: charges the time since the last mark to a phase. */
void ds_cuda_mark(ds_backend *b, int phase)
{
	if (!b->prof)
		return;
	cudaStreamSynchronize(b->s);
	double t = wall();
	if (phase >= 0)
		b->prof_t[phase] += t - b->prof_last;
	b->prof_last = t;
}
int ds_cuda_backend_kv_blocks(const ds_backend *b) { return b->kv_blocks; }
void ds_cuda_backend_set_device_moe(ds_backend *b, int max_tokens) { b->dev_moe_max_t = max_tokens; }
void ds_cuda_backend_set_host_plan(ds_backend *b, int on) { b->moe_host_plan = on; }
void ds_cuda_backend_set_gemv(ds_backend *b, int on)
{
	dsk_gemm_set_gemv(b->gemm, on);
	dsk_graphs_clear(b->graphs);
}

int ds_cuda_backend_set_graphs(ds_backend *b, int on)
{
	if (!on) {
		b->graphs = (dsk_graphs_free(b->graphs), NULL);
		return 0;
	}
	return b->graphs ? 0 : dsk_graphs_new(GRAPHS_KEPT, &b->graphs);
}

void ds_cuda_backend_set_pdl(ds_backend *b, int on)
{
	dsk_set_pdl(on);
	dsk_graphs_clear(b->graphs);
}

void ds_cuda_backend_graph_stats(const ds_backend *b, long *replays, long *captures, long *eager)
{
	dsk_graph_stats st = { 0 };
	if (b->graphs)
		st = dsk_graphs_stats(b->graphs);
	*replays = st.replays;
	*captures = st.captures;
	*eager = st.eager;
}

int ds_cuda_cerr(ds_err *e, cudaError_t err, const char *what)
{
	return ds_errf(e, err == cudaErrorMemoryAllocation ? -ENOMEM : -EIO, "cuda backend: %s: %s", what,
		       cudaGetErrorString(err));
}

static void *dalloc(ds_backend *b, size_t bytes, ds_err *e, int *rc)
{
	void *p = NULL;
	if (*rc)
		return NULL;
	if (b->n_allocs == b->cap_allocs) {
		int cap = b->cap_allocs ? 2 * b->cap_allocs : 256;
		void **n = realloc(b->allocs, sizeof(void *) * (size_t)cap);
		if (!n) {
			*rc = -ENOMEM;
			return NULL;
		}
		b->allocs = n;
		b->cap_allocs = cap;
	}
	cudaError_t err = cudaMalloc(&p, bytes ? bytes : 16);
	if (err != cudaSuccess) {
		cudaGetLastError();
		*rc = ds_errf(e, -ENOMEM, "cuda backend: out of GPU memory allocating %zu bytes", bytes);
		return NULL;
	}
	b->allocs[b->n_allocs++] = p;
	return p;
}

static int upload(void *dst, const void *src, size_t n, ds_err *e)
{
	cudaError_t err = cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice);
	return err == cudaSuccess ? 0 : ds_cuda_cerr(e, err, "weight upload");
}

/* The tensor's bytes in the io_uring arena, or NULL (not streamed). */
static void *arena_ptr(const ds_backend *b, const ds_tensor_ref *t)
{
	return b->wl && t ? ds_wload_cuda_ptr(b->wl, (size_t)(t - b->ref0)) : NULL;
}

/* Any stored dtype to bf16 rows, converted on the host a row at a time. */
static dsk_bf16 *upload_bf16(ds_backend *b, const ds_wmat *W, ds_err *e, int *rc)
{
	const size_t n = (size_t)W->rows * W->cols;
	if (!*rc && W->w->dtype == DS_DT_BF16 && arena_ptr(b, W->w)) {
		b->weight_bytes += n * 2;
		return arena_ptr(b, W->w);
	}
	dsk_bf16 *d = dalloc(b, n * 2, e, rc);
	if (*rc)
		return NULL;
	b->weight_bytes += n * 2;
	if (W->w->dtype == DS_DT_BF16) {
		*rc = upload(d, W->w->data, n * 2, e);
		return d;
	}
	const int rows_per = 256;
	float *row = malloc(sizeof(float) * (size_t)W->cols);
	uint16_t *buf = malloc(sizeof(uint16_t) * (size_t)W->cols * rows_per);
	if (!row || !buf) {
		*rc = -ENOMEM;
	} else {
		for (int r0 = 0; r0 < W->rows && !*rc; r0 += rows_per) {
			int nr = W->rows - r0 < rows_per ? W->rows - r0 : rows_per;
			for (int r = 0; r < nr; r++) {
				ds_cpu_weight_row(row, W, r0 + r);
				for (int c = 0; c < W->cols; c++)
					buf[(size_t)r * W->cols + c] = ds_f32_to_bf16(row[c]);
			}
			*rc = upload(d + (size_t)r0 * W->cols, buf, sizeof(uint16_t) * (size_t)nr * W->cols, e);
		}
	}
	free(row);
	free(buf);
	return d;
}

static void load_weight(ds_backend *b, const ds_wmat *W, dsk_weight *out, ds_err *e, int *rc)
{
	memset(out, 0, sizeof(*out));
	if (*rc || !W->w)
		return;
	out->rows = W->rows;
	out->cols = W->cols;
	if (W->w->dtype == DS_DT_F8_E4M3 && dsk_gemm_fp8_ok(W->rows, W->cols)) {
		const int sr = (W->rows + 127) / 128, sc = (W->cols + 127) / 128, sld = (sc + 3) & ~3;
		float *hs = calloc((size_t)sr * sld, sizeof(float));
		if (!hs) {
			*rc = -ENOMEM;
			return;
		}
		for (int r = 0; r < sr; r++)
			for (int c = 0; c < sc; c++) {
				size_t i = (size_t)r * sc + c;
				hs[(size_t)r * sld + c] = W->scale_inv->dtype == DS_DT_F32
								  ? ((const float *)W->scale_inv->data)[i]
								  : ds_bf16_to_f32(((const uint16_t *)W->scale_inv->data)[i]);
			}
		size_t n = (size_t)W->rows * W->cols;
		void *dw = arena_ptr(b, W->w);
		int streamed = dw != NULL;
		if (!streamed)
			dw = dalloc(b, n, e, rc);
		float *ds = dalloc(b, sizeof(float) * (size_t)sr * sld, e, rc);
		if (!*rc && !streamed)
			*rc = upload(dw, W->w->data, n, e);
		if (!*rc)
			*rc = upload(ds, hs, sizeof(float) * (size_t)sr * sld, e);
		free(hs);
		out->type = DSK_W_FP8;
		out->w = dw;
		out->scale = ds;
		out->sld = sld;
		b->weight_bytes += n + sizeof(float) * (size_t)sr * sld;
		return;
	}
	if (W->w->dtype == DS_DT_F8_E4M3)
		b->fallbacks++;
	out->type = DSK_W_BF16;
	out->w = upload_bf16(b, W, e, rc);
}

static float *load_vec(ds_backend *b, ds_wvec t, int n, ds_err *e, int *rc)
{
	if (*rc || !t)
		return NULL;
	float *h = malloc(sizeof(float) * (size_t)n);
	if (!h) {
		*rc = -ENOMEM;
		return NULL;
	}
	ds_cpu_vec_load(h, t, n);
	float *d = dalloc(b, sizeof(float) * (size_t)n, e, rc);
	if (!*rc)
		*rc = upload(d, h, sizeof(float) * (size_t)n, e);
	free(h);
	return d;
}

static dsk_bf16 *load_embed(ds_backend *b, const ds_tensor_ref *t, int rows, int cols, ds_err *e, int *rc)
{
	ds_wmat w = { .w = t, .rows = rows, .cols = cols };
	if (*rc || !t)
		return NULL;
	return upload_bf16(b, &w, e, rc);
}

/* Pointer tables for dsk_moe_gemv; the path is used only when all experts
 * share one type and the GEMV takes their shapes. */
static int expert_tables(ds_backend *b, dlayer *d, int E, ds_err *e)
{
	const dsk_weight *mats[3] = { d->eg, d->eu, d->ed };
	int rc = 0, ok = 1;
	/* Gate and up share one launch (one type); down is its own launch and
	 * may differ: an FP8 checkpoint whose down projections are not a
	 * multiple of 128 wide is dequantized for them only at load. */
	for (int k = 0; k < 3; k++) {
		const int type = mats[k == 2 ? 2 : 0][0].type;
		for (int x = 0; x < E; x++)
			ok &= mats[k][x].type == type && mats[k][x].cols % (type == DSK_W_FP8 ? 128 : 8) == 0;
	}
	d->dev_moe = ok;
	d->moe_fp8 = d->eg[0].type == DSK_W_FP8;
	d->moe_fp8_down = d->ed[0].type == DSK_W_FP8;
	if (!ok)
		return 0;
	const void **hw = malloc(sizeof(void *) * (size_t)E);
	const float **hs = malloc(sizeof(float *) * (size_t)E);
	if (!hw || !hs)
		rc = -ENOMEM;
	for (int k = 0; k < 3 && !rc; k++) {
		for (int x = 0; x < E; x++) {
			hw[x] = mats[k][x].w;
			hs[x] = mats[k][x].scale;
		}
		d->esld[k] = mats[k][0].sld;
		d->ew[k] = dalloc(b, sizeof(void *) * (size_t)E, e, &rc);
		d->es[k] = dalloc(b, sizeof(float *) * (size_t)E, e, &rc);
		if (!rc)
			rc = upload((void *)d->ew[k], hw, sizeof(void *) * (size_t)E, e);
		if (!rc)
			rc = upload((void *)d->es[k], hs, sizeof(float *) * (size_t)E, e);
	}
	free(hw);
	free(hs);
	return rc;
}

static void destroy(ds_backend *b)
{
	if (!b)
		return;
	if (b->s)
		cudaStreamSynchronize(b->s);
	b->wl = ds_wload_cuda_free(b->wl);
	for (int i = 0; i < b->n_allocs; i++)
		cudaFree(b->allocs[i]);
	free(b->allocs);
	cudaFree(b->ws);
	cudaFree(b->pf_buf);
	cudaFree(b->lg);
	cudaFree(b->amax);
	cudaFree(b->drawp);
	cudaFreeHost(b->h_draw);
	dsk_graphs_free(b->graphs);
	free(b->pf);
	cudaFreeHost(b->h_i32);
	cudaFreeHost(b->h_f32);
	if (b->L) {
		for (int i = 0; i < b->m->n_layers + b->m->n_mtp; i++) {
			free(b->L[i].eg);
			free(b->L[i].eu);
			free(b->L[i].ed);
		}
	}
	free(b->L);
	dsk_gemm_free(b->gemm);
	dsk_gemm_free(b->gemm2);
	if (b->ev_fork)
		cudaEventDestroy(b->ev_fork);
	if (b->ev_join)
		cudaEventDestroy(b->ev_join);
	if (b->s2)
		cudaStreamDestroy(b->s2);
	if (b->blas)
		cublasDestroy(b->blas);
	if (b->s)
		cudaStreamDestroy(b->s);
	free(b);
}

/* Bytes of weights the GPU will hold (FP8 kept as FP8 where cuBLASLt takes it). */
static size_t weights_needed(const ds_model *m)
{
	size_t total = 0;
	for (size_t i = 0; i < ds_weights_count(m->weights); i++) {
		const ds_tensor_ref *t = ds_weights_at(m->weights, i);
		if (!t->used)
			continue;
		size_t n = t->nbytes / (ds_dtype_size(t->dtype) ? ds_dtype_size(t->dtype) : 1);
		total += t->dtype == DS_DT_F8_E4M3 ? n : t->dtype == DS_DT_F32 && t->ndim == 2 ? 2 * n : t->nbytes;
	}
	return total;
}

/* Streams every matrix stored as bf16 or FP8 (what the kernels use as
 * stored: the bulk of the bytes) from the shards into one device arena with
 * io_uring, O_DIRECT where the filesystem allows it; vectors, scales and
 * matrices that need converting still come from the mapping. A short read, a
 * changed shard or an I/O error fails the whole load (nothing half-loaded). */
static int stream_weights(ds_backend *b, ds_backend_config *cfg, ds_err *e)
{
	const ds_weights *w = b->m->weights;
	size_t n_all = ds_weights_count(w), n = 0;
	const ds_tensor_ref **refs = malloc(sizeof(*refs) * (n_all ? n_all : 1));
	if (!refs)
		return -ENOMEM;
	for (size_t i = 0; i < n_all; i++) {
		const ds_tensor_ref *t = ds_weights_at(w, i);
		if (t->used && t->ndim == 2 && (t->dtype == DS_DT_BF16 || t->dtype == DS_DT_F8_E4M3))
			refs[n++] = t;
	}
	int rc = 0;
	size_t bytes = ds_wload_cuda_arena_bytes(w, refs, n);
	void *arena = n ? dalloc(b, bytes, e, &rc) : NULL;
	if (!rc && n)
		rc = ds_wload_cuda_new(w, arena, bytes, 4, &b->wl);
	if (!rc && n) {
		ds_wload_sink sink;
		ds_wload_cuda_sink(b->wl, &sink);
		b->ref0 = ds_weights_at(w, 0);
		rc = ds_wload_run(w, refs, n, &sink, NULL, cfg->load_progress, &cfg->load_result, e);
		if (!rc && (rc = ds_wload_cuda_sync(b->wl)))
			ds_errf(e, rc, "cuda backend: weight upload: %s", ds_wload_cuda_error(b->wl));
		else if (rc && !e->msg[0])
			ds_errf(e, rc, "cuda backend: streaming the weights failed: %s", ds_wload_cuda_error(b->wl));
	} else if (rc == -ENOMEM && !e->msg[0]) {
		ds_errf(e, rc, "cuda backend: out of memory");
	}
	free(refs);
	return rc;
}

static int create(const ds_model *m, ds_backend_config *cfg, ds_backend **out, ds_err *e)
{
	const ds_config *c = &m->cfg;
	int ndev = 0;
	cudaError_t err = cudaGetDeviceCount(&ndev);
	if (err != cudaSuccess || ndev == 0) {
		cudaGetLastError();
		return ds_errf(e, -ENODEV, "cuda backend: no GPU (%s)", err != cudaSuccess ? cudaGetErrorString(err) : "none");
	}
	if (cfg->device < 0 || cfg->device >= ndev)
		return ds_errf(e, -ENODEV, "cuda backend: GPU %d does not exist (%d present)", cfg->device, ndev);
	if (cfg->block_tokens <= 0)
		return ds_errf(e, -EINVAL, "cuda backend: block_tokens must be > 0");
	if (c->kv_lora_rank > 512 || (ds_config_kv_dim(c)) % 8 || c->qk_rope_head_dim > 512)
		return ds_errf(e, -ENOTSUP, "cuda backend: kv_lora_rank %d / rope %d not supported by the attention kernel",
			       c->kv_lora_rank, c->qk_rope_head_dim);
	if (c->hidden_size % 8)
		return ds_errf(e, -ENOTSUP, "cuda backend: hidden_size %d is not a multiple of 8", c->hidden_size);
	if (c->hidden_size > DSK_NORM_MAX_DIM || c->q_lora_rank > DSK_NORM_MAX_DIM ||
	    c->num_experts_per_tok > DSK_NORM_MAX_K)
		return ds_errf(e, -ENOTSUP, "cuda backend: hidden_size %d / q_lora_rank %d / %d experts a token: the "
			       "norm kernels take rows of at most %d and %d experts",
			       c->hidden_size, c->q_lora_rank, c->num_experts_per_tok, DSK_NORM_MAX_DIM, DSK_NORM_MAX_K);
	if ((err = cudaSetDevice(cfg->device)) != cudaSuccess)
		return ds_cuda_cerr(e, err, "set device");
	size_t free_b = 0, total_b = 0;
	if ((err = cudaMemGetInfo(&free_b, &total_b)) != cudaSuccess)
		return ds_cuda_cerr(e, err, "memory info");
	const size_t need = weights_needed(m);
	if (need > free_b)
		return ds_errf(e, -ENOMEM, "cuda backend: the model needs %.2f GiB of GPU memory for weights, %.2f GiB free",
			       need / 1073741824.0, free_b / 1073741824.0);

	ds_backend *b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->m = m;
	b->dev = cfg->device;
	b->block_tokens = cfg->block_tokens;
	b->dev_moe_max_t = DEV_MOE_MAX_T;
	int rc = 0;
	cudaDeviceGetAttribute(&b->sms, cudaDevAttrMultiProcessorCount, b->dev);
	if ((err = cudaStreamCreateWithFlags(&b->s, cudaStreamNonBlocking)) != cudaSuccess) {
		destroy(b);
		return ds_cuda_cerr(e, err, "stream");
	}
	if (cublasCreate(&b->blas) != CUBLAS_STATUS_SUCCESS) {
		b->blas = NULL;
		destroy(b);
		return ds_errf(e, -EIO, "cuda backend: cublasCreate failed");
	}
	cublasSetStream(b->blas, b->s);
	if ((rc = dsk_gemm_create(b->s, &b->gemm, e))) {
		destroy(b);
		return rc;
	}
	if ((err = cudaStreamCreateWithFlags(&b->s2, cudaStreamNonBlocking)) != cudaSuccess ||
	    (err = cudaEventCreateWithFlags(&b->ev_fork, cudaEventDisableTiming)) != cudaSuccess ||
	    (err = cudaEventCreateWithFlags(&b->ev_join, cudaEventDisableTiming)) != cudaSuccess) {
		destroy(b);
		return ds_cuda_cerr(e, err, "side stream");
	}
	if ((rc = dsk_gemm_create(b->s2, &b->gemm2, e))) {
		destroy(b);
		return rc;
	}
	/* cuBLAS's own workspace, so that its calls can be captured. */
	void *blas_ws = dalloc(b, BLAS_WS_BYTES, e, &rc);
	if (rc || cublasSetWorkspace(b->blas, blas_ws, BLAS_WS_BYTES) != CUBLAS_STATUS_SUCCESS) {
		destroy(b);
		return rc ? rc : ds_errf(e, -EIO, "cuda backend: cublasSetWorkspace failed");
	}
	if (!cfg->eager && (rc = dsk_graphs_new(GRAPHS_KEPT, &b->graphs))) {
		destroy(b);
		return rc;
	}

	const int NL = m->n_layers + m->n_mtp, H = c->hidden_size;
	b->L = calloc((size_t)NL, sizeof(dlayer));
	if (!b->L) {
		destroy(b);
		return -ENOMEM;
	}
	if (cfg->uring_load && (rc = stream_weights(b, cfg, e))) {
		destroy(b);
		return rc;
	}
	b->embed = load_embed(b, m->embed, c->vocab_size, H, e, &rc);
	b->final_norm = load_vec(b, m->final_norm, H, e, &rc);
	load_weight(b, &m->lm_head, &b->lm_head, e, &rc);
	for (int i = 0; i < NL && !rc; i++) {
		const ds_layer_w *w = &m->layers[i];
		dlayer *d = &b->L[i];
		d->input_norm = load_vec(b, w->input_norm, H, e, &rc);
		d->post_norm = load_vec(b, w->post_attn_norm, H, e, &rc);
		d->q_a_norm = load_vec(b, w->q_a_norm, c->q_lora_rank, e, &rc);
		d->kv_a_norm = load_vec(b, w->kv_a_norm, c->kv_lora_rank, e, &rc);
		d->router_bias = load_vec(b, w->router_bias, c->n_routed_experts, e, &rc);
		d->enorm = load_vec(b, w->enorm, H, e, &rc);
		d->hnorm = load_vec(b, w->hnorm, H, e, &rc);
		d->head_norm = load_vec(b, w->head_norm, H, e, &rc);
		if (c->q_lora_rank > 0) {
			load_weight(b, &w->q_a_proj, &d->q_a, e, &rc);
			load_weight(b, &w->q_b_proj, &d->q_b, e, &rc);
		} else {
			load_weight(b, &w->q_proj, &d->q_proj, e, &rc);
		}
		load_weight(b, &w->kv_a_proj, &d->kv_a, e, &rc);
		d->kvb = rc ? NULL : upload_bf16(b, &w->kv_b_proj, e, &rc);
		load_weight(b, &w->o_proj, &d->o_proj, e, &rc);
		if (w->is_moe) {
			const int E = c->n_routed_experts;
			load_weight(b, &w->router, &d->router, e, &rc);
			d->eg = calloc((size_t)E, sizeof(dsk_weight));
			d->eu = calloc((size_t)E, sizeof(dsk_weight));
			d->ed = calloc((size_t)E, sizeof(dsk_weight));
			if (!d->eg || !d->eu || !d->ed)
				rc = -ENOMEM;
			for (int x = 0; x < E && !rc; x++) {
				load_weight(b, &w->exp_gate[x], &d->eg[x], e, &rc);
				load_weight(b, &w->exp_up[x], &d->eu[x], e, &rc);
				load_weight(b, &w->exp_down[x], &d->ed[x], e, &rc);
			}
			if (!rc)
				rc = expert_tables(b, d, E, e);
			if (c->n_shared_experts > 0) {
				load_weight(b, &w->sh_gate, &d->sh_gate, e, &rc);
				load_weight(b, &w->sh_up, &d->sh_up, e, &rc);
				load_weight(b, &w->sh_down, &d->sh_down, e, &rc);
			}
		} else {
			load_weight(b, &w->gate_proj, &d->gate, e, &rc);
			load_weight(b, &w->up_proj, &d->up, e, &rc);
			load_weight(b, &w->down_proj, &d->down, e, &rc);
		}
		if (w->is_mtp) {
			load_weight(b, &w->eh_proj, &d->eh_proj, e, &rc);
			load_weight(b, &w->head, &d->head, e, &rc);
			d->mtp_embed = load_embed(b, w->mtp_embed, c->vocab_size, H, e, &rc);
		}
	}
	b->wl = ds_wload_cuda_free(b->wl); /* the arena stays: weights point into it */
	/* FP8 weights reading normed rows: the norms write their FP8 copy. */
	for (int li = 0; li < NL && !rc && H % 128 == 0; li++) {
		const dlayer *d = &b->L[li];
		b->preq |= d->kv_a.type == DSK_W_FP8 || d->moe_fp8 || d->sh_gate.type == DSK_W_FP8 ||
			   d->gate.type == DSK_W_FP8;
	}
	if (!rc && c->n_routed_experts > 0) {
		size_t nb = sizeof(unsigned long long) * (size_t)NL * c->n_routed_experts;
		b->eload = dalloc(b, nb, e, &rc);
		if (!rc && cudaMemset(b->eload, 0, nb) != cudaSuccess)
			rc = ds_errf(e, -EIO, "cuda backend: cudaMemset failed");
	}
	float inv_freq[512];
	ds_rope_inv_freq(c, inv_freq, &b->attn_factor);
	b->softmax_scale = (float)ds_config_softmax_scale(c);
	if (getenv("DS_CUDA_PDL") && !atoi(getenv("DS_CUDA_PDL")))
		dsk_set_pdl(0);
	const char *fl = getenv("DS_CUDA_FLASH");
	b->flash = dsk_flash_ok(c->qk_nope_head_dim, c->qk_rope_head_dim, c->v_head_dim) && !(fl && !atoi(fl));
	const char *mg = getenv("DS_CUDA_MOE_GEMM");
	b->moe_gemm = !(mg && !atoi(mg));
	/* device-planned steps of 12 or more rows an expert on average take the
	 * grouped GEMMs too: V2-Lite at batch 256 (24) reads each expert's
	 * weights once where the 16-row GEMV passes read them twice (H100, bf16,
	 * ids 25.5 -> 20.1 ms); at batch 64 (6) they lose (14.4 -> 15.7) */
	const char *mr = getenv("DS_CUDA_MOE_GEMM_MIN_ROWS");
	b->moe_gemm_min_rows = !b->moe_gemm ? 1 << 20 : mr && atoi(mr) > 0 ? atoi(mr) : 12;
	b->moe_gemm_fp8_dev = getenv("DS_CUDA_MOE_GEMM_FP8_DEV") && atoi(getenv("DS_CUDA_MOE_GEMM_FP8_DEV"));
	b->moe_host_plan = getenv("DS_CUDA_MOE_HOST_PLAN") && atoi(getenv("DS_CUDA_MOE_HOST_PLAN"));
	b->inv_freq = dalloc(b, sizeof(float) * 256, e, &rc);
	if (!rc)
		rc = upload(b->inv_freq, inv_freq, sizeof(float) * (size_t)(c->qk_rope_head_dim / 2), e);
	if (rc) {
		destroy(b);
		return rc;
	}

	const int kvd = ds_config_kv_dim(c);
	b->kv_layer_stride = (size_t)b->block_tokens * kvd;
	b->kv_block_stride = b->kv_layer_stride * NL;
	const size_t block_bytes = sizeof(dsk_bf16) * b->kv_block_stride;
	b->kv_blocks = cfg->kv_blocks;
	if (b->kv_blocks <= 0 && cfg->kv_bytes > 0) {
		b->kv_blocks = (int)(cfg->kv_bytes / block_bytes);
		if (b->kv_blocks < 1) {
			destroy(b);
			return ds_errf(e, -EINVAL, "cuda backend: kv_bytes %zu holds no %zu-byte KV block", cfg->kv_bytes,
				       block_bytes);
		}
		cfg->kv_blocks = b->kv_blocks;
	}
	if (b->kv_blocks <= 0) {
		double f = cfg->gpu_kv_fraction > 0 && cfg->gpu_kv_fraction < 1 ? cfg->gpu_kv_fraction : 0.9;
		if ((err = cudaMemGetInfo(&free_b, &total_b)) != cudaSuccess) {
			destroy(b);
			return ds_cuda_cerr(e, err, "memory info");
		}
		b->kv_blocks = (int)((double)free_b * f / (double)block_bytes);
		if (b->kv_blocks < 1) {
			destroy(b);
			return ds_errf(e, -ENOMEM, "cuda backend: %.2f GiB free after the weights holds no %zu-byte KV block",
				       free_b / 1073741824.0, block_bytes);
		}
		/* The engine passes its own config and reads the count back. */
		cfg->kv_blocks = b->kv_blocks;
	}
	b->kv = dalloc(b, block_bytes * (size_t)b->kv_blocks, e, &rc);
	/* The uploads and memsets above went to the legacy stream, which the
	 * backend's non-blocking streams do not wait for. */
	if (!rc && (err = cudaDeviceSynchronize()) != cudaSuccess)
		rc = ds_cuda_cerr(e, err, "weight upload");
	if (rc) {
		destroy(b);
		return rc;
	}
	*out = b;
	return 0;
}

/* Between steps only: waits for the stream. */
static int expert_load(ds_backend *b, uint64_t *out)
{
	const ds_config *c = &b->m->cfg;
	if (!b->eload)
		return -ENOTSUP;
	size_t n = (size_t)(b->m->n_layers + b->m->n_mtp) * c->n_routed_experts;
	cudaError_t err = cudaStreamSynchronize(b->s);
	if (err == cudaSuccess)
		err = cudaMemcpy(out, b->eload, sizeof(uint64_t) * n, cudaMemcpyDeviceToHost);
	return err == cudaSuccess ? 0 : -EIO;
}

static size_t weight_bytes(const ds_backend *b) { return b->weight_bytes; }

/* Carves the step workspace for T tokens and n_seqs tables of mb blocks. */
static int ensure_ws(ds_backend *b, int T, int n_seqs, int mb, ds_err *e)
{
	if (T <= b->cap_T && n_seqs <= b->cap_seqs && mb <= b->cap_mb)
		return 0;
	const ds_config *c = &b->m->cfg;
	int cT = T > b->cap_T ? (T < 64 ? 64 : T) : b->cap_T;
	int cs = n_seqs > b->cap_seqs ? (n_seqs < 64 ? 64 : n_seqs) : b->cap_seqs;
	int cm = mb > b->cap_mb ? (mb < 64 ? 64 : mb) : b->cap_mb;
	const int Tp = dsk_gemm_pad(cT);
	const int H = c->hidden_size, nh = c->num_attention_heads, qk = ds_config_qk_head_dim(c);
	const int kvl = c->kv_lora_rank, kvd = ds_config_kv_dim(c), vd = c->v_head_dim;
	const int E = c->n_routed_experts > 0 ? c->n_routed_experts : 1, K = c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1;
	int I = c->intermediate_size;
	const int SI = c->moe_intermediate_size * (c->n_shared_experts > 0 ? c->n_shared_experts : 1);
	if (SI > I)
		I = SI;
	if (c->moe_intermediate_size > I)
		I = c->moe_intermediate_size;
	/* plan rows: a multiple of 4, the FP8 scales' row stride (cuda_layer.c) */
	const int P = (cT * K + 15 * E + 3) & ~3;
	const int nsplit_max = 64;
	size_t attn_n = dsk_attn_ws_floats(cT, nh, kvl, dsk_attn_splits(cT, nh, 1 << 30, b->sms));
	size_t alt = dsk_attn_ws_floats(1, nh, kvl, nsplit_max);
	if (alt > attn_n)
		attn_n = (size_t)nsplit_max * nh * (kvl + 2) * (cT < 8 ? cT : 8);
	if (attn_n < dsk_attn_ws_floats(cT, nh, kvl, 1))
		attn_n = dsk_attn_ws_floats(cT, nh, kvl, 1);
	size_t off = 0;
#define CARVE(ptr, type, n)                                             \
	do {                                                            \
		b->ptr = (type *)(uintptr_t)off;                        \
		off += ((sizeof(type) * (size_t)(n)) + 255) & ~(size_t)255; \
	} while (0)
	CARVE(x, float, (size_t)Tp * H);
	CARVE(y, float, (size_t)Tp * 2 * H);
	CARVE(hin, float, (size_t)Tp * H);
	CARVE(of, float, (size_t)Tp * H);
	CARVE(q, float, (size_t)Tp * nh * qk);
	CARVE(qa, float, (size_t)Tp * (c->q_lora_rank > 0 ? c->q_lora_rank : 1));
	CARVE(kvx, float, (size_t)Tp * kvd);
	CARVE(qabs, float, (size_t)Tp * nh * kvl);
	CARVE(g, float, (size_t)Tp * I);
	CARVE(u, float, (size_t)Tp * I);
	CARVE(logits_r, float, (size_t)Tp * E);
	CARVE(moe_w, float, (size_t)cT * K);
	CARVE(gp, float, (size_t)P * c->moe_intermediate_size);
	CARVE(up, float, (size_t)P * c->moe_intermediate_size);
	CARVE(yp, float, (size_t)P * H);
	CARVE(ysh, float, (size_t)Tp * H);
	CARVE(attn_ws, float, attn_n);
	CARVE(xn, dsk_bf16, (size_t)Tp * 2 * H);
	CARVE(qan, dsk_bf16, (size_t)Tp * (c->q_lora_rank > 0 ? c->q_lora_rank : 1));
	CARVE(qb, dsk_bf16, (size_t)Tp * nh * qk);
	CARVE(lat, dsk_bf16, (size_t)Tp * nh * kvl);
	CARVE(o, dsk_bf16, (size_t)Tp * nh * vd);
	CARVE(h, dsk_bf16, (size_t)Tp * I);
	CARVE(hp, dsk_bf16, (size_t)P * c->moe_intermediate_size);
	CARVE(sel, dsk_bf16, (size_t)Tp * H);
	CARVE(tok, int32_t, Tp);
	CARVE(pos, int32_t, Tp);
	CARVE(seq, int32_t, Tp);
	CARVE(sel_idx, int32_t, Tp);
	CARVE(tables, int32_t, (size_t)cs * cm);
	CARVE(ids, int32_t, (size_t)cT * K);
	CARVE(cnt, int32_t, E);
	CARVE(off, int32_t, E + 1);
	CARVE(ppos, int32_t, (size_t)cT * K);
	CARVE(row_tok, int32_t, P);
	CARVE(alist, int32_t, Tp);
	CARVE(act, int32_t, E + 1);
	CARVE(chn, int32_t, 2 * (size_t)cs);
	{
		const size_t wmax = (size_t)(H > c->moe_intermediate_size ? H : c->moe_intermediate_size);
		const size_t rmax = (size_t)(P > Tp ? P : Tp);
		CARVE(qx, uint8_t, rmax * wmax);
		CARVE(qxs, float, rmax * (wmax / 128 + 1));
		const size_t nmax = (size_t)(H > c->q_lora_rank ? H : c->q_lora_rank);
		CARVE(qn, uint8_t, (size_t)Tp * nmax);
		CARVE(qns, float, (size_t)Tp * (nmax / 128 + 1));
	}
#undef CARVE
	cudaStreamSynchronize(b->s);
	cudaFree(b->ws);
	b->ws = NULL;
	b->cap_T = b->cap_seqs = b->cap_mb = 0;
	cudaError_t err = cudaMalloc((void **)&b->ws, off);
	if (err != cudaSuccess) {
		cudaGetLastError();
		return ds_errf(e, -ENOMEM, "cuda backend: no GPU memory for a %d-token step (%.1f MiB)", cT, off / 1048576.0);
	}
	/* Padding rows are read by GEMMs: keep them finite. On b->s: a plain
	 * cudaMemset goes to the legacy stream, which b->s (non-blocking) does
	 * not wait for, and could land after this step's first kernels wrote
	 * (seen with another process busy on the GPU). */
	if ((err = cudaMemsetAsync(b->ws, 0, off, b->s)) != cudaSuccess)
		return ds_cuda_cerr(e, err, "workspace");
	char *base = b->ws;
#define FIX(ptr) b->ptr = (void *)(base + (uintptr_t)b->ptr)
	FIX(x); FIX(y); FIX(hin); FIX(of); FIX(q); FIX(qa); FIX(kvx); FIX(qabs); FIX(g); FIX(u); FIX(logits_r);
	FIX(moe_w); FIX(gp); FIX(up); FIX(yp); FIX(ysh); FIX(attn_ws); FIX(xn); FIX(qan); FIX(qb); FIX(lat); FIX(o);
	FIX(h); FIX(xp); FIX(hp); FIX(sel); FIX(tok); FIX(pos); FIX(seq); FIX(sel_idx); FIX(tables); FIX(ids);
	FIX(cnt); FIX(off); FIX(ppos); FIX(row_tok); FIX(qx); FIX(qxs); FIX(qn); FIX(qns); FIX(alist);
	FIX(act); FIX(chn);
#undef FIX
	/* The host-planned experts' gathered rows (P x H bf16) live in yp's
	 * memory (P x H float): read by the gate/up GEMMs (or quantized) before
	 * the down projections write yp, on one stream. Large steps run on the
	 * device plan and gather nothing; a buffer of its own cost 104 MB at
	 * V2-Lite's 4096-token step. */
	b->xp = (dsk_bf16 *)b->yp;
	b->moe_rows = P;
	b->attn_ws_n = attn_n;
	b->cap_T = cT;
	b->cap_seqs = cs;
	b->cap_mb = cm;
	size_t hneed = (size_t)cs * cm + 5 * (size_t)Tp + 2 * (size_t)E + 8;
	if (hneed > b->h_cap) {
		cudaFreeHost(b->h_i32);
		b->h_i32 = NULL;
		b->h_cap = 0;
		if ((err = cudaMallocHost((void **)&b->h_i32, sizeof(int32_t) * hneed)) != cudaSuccess) {
			cudaGetLastError();
			return ds_errf(e, -ENOMEM, "cuda backend: no pinned host memory");
		}
		b->h_cap = hneed;
	}
	return 0;
}

/* Attention splits its work by the context length; rounding the length up
 * keeps the number of distinct step shapes (and graphs) small, and eager and
 * replayed steps split alike, so they compute the same bits. */
static int len_bucket(int n)
{
	const int q = n <= 2048 ? 256 : n <= 16384 ? 2048 : 8192;
	return (n + q - 1) / q * q;
}

/* What a step's launches depend on beyond the uploaded arrays. */
struct step {
	ds_backend *b;
	int mtp, T, rows, max_len;
	dsk_kv_geom geo;
	/* token ids, and for MTP the hidden input: the uploaded ones, or in a
	 * chained MTP step the main step's argmax rows and final-normed rows */
	const int32_t *tok;
	float *hin;
};

/* Embedding to logits, on the device only: no host synchronization, no
 * allocation, so decode-sized steps can be captured (kernels/graph.h). */
static int step_body(void *ctx, ds_err *e)
{
	const struct step *st = ctx;
	ds_backend *b = st->b;
	const ds_model *m = b->m;
	const ds_config *c = &m->cfg;
	const int H = c->hidden_size, V = c->vocab_size, T = st->T;
	int first, last, rc;
	if (!st->mtp) {
		TRY(dsk_embed(b->x, b->embed, st->tok, T, H, b->s, e));
		first = 0;
		last = m->n_layers;
	} else {
		const int li = m->n_layers + st->mtp - 1;
		const dlayer *d = &b->L[li];
		TRY(dsk_embed(b->x, d->mtp_embed, st->tok, T, H, b->s, e));
		/* [T][2H]: normed embedding, then normed hidden state. */
		b->xn_q = 0;
		TRY(dsk_add_rmsnorm(b->x, NULL, d->enorm, T, H, c->rms_norm_eps, b->xn, 2 * H, NULL, NULL, b->s, e));
		TRY(dsk_add_rmsnorm(st->hin, NULL, d->hnorm, T, H, c->rms_norm_eps, b->xn + H, 2 * H, NULL, NULL, b->s,
				    e));
		TRY(ds_cuda_gemm(b, b->x, H, b->xn, T, &d->eh_proj, e));
		first = li;
		last = li + 1;
	}
	const float *fn = st->mtp ? b->L[m->n_layers + st->mtp - 1].head_norm : b->final_norm;
	const dsk_weight *head = st->mtp ? &b->L[m->n_layers + st->mtp - 1].head : &b->lm_head;
	ds_cuda_mark(b, 0);
	TRY(ds_cuda_norm_xn(b, b->x, NULL, b->L[first].input_norm, T, NULL, e));
	/* Each block ends with the residual add of its MLP and the next norm:
	 * the last one's is the final norm (x keeps the pre-norm state: MTP's
	 * hidden output; of the normed rows in float). */
	for (int li = first; li < last; li++) {
		const struct next_norm nn = { li + 1 < last ? b->L[li + 1].input_norm : fn, li + 1 < last ? NULL : b->of };
		TRY(ds_cuda_block(b, li, T, st->max_len, &st->geo, &nn, e));
	}
	if (st->rows > 0) {
		/* every row, in order (a decode step): the head reads xn itself */
		const dsk_bf16 *hx = b->xn;
		if (st->rows < T) {
			TRY(dsk_gather_rows(b->sel, b->xn, b->sel_idx, st->rows, H, b->s, e));
			hx = b->sel;
		}
		TRY(ds_cuda_gemm(b, b->lg, V, hx, st->rows, head, e));
		TRY(dsk_draw_rows(b->amax, b->lg, st->rows, V, V, b->drawp, b->s, e));
	}
	return 0;
}

/* Steps a graph can hold: every sequence through the split-KV kernel and
 * every MoE layer on the device-side path (no host round trip). */
static int graphable(const ds_backend *b, int T, int first, int last)
{
	if (!b->graphs || b->prof || b->n_pf || T > b->dev_moe_max_t)
		return 0;
	for (int li = first; li < last; li++)
		if (b->m->layers[li].is_moe && !b->L[li].dev_moe)
			return 0;
	return 1;
}

/* Buffers graphs hold pointers to were reallocated: forget the graphs. */
static void graphs_check(ds_backend *b)
{
	unsigned gen = dsk_gemm_generation(b->gemm) * 31u + dsk_gemm_generation(b->gemm2);
	if (gen != b->gemm_gen) {
		dsk_graphs_clear(b->graphs);
		b->gemm_gen = gen;
	}
}

/* A step's body, as the graph for key where it can be one, else eager. */
static int run_body(ds_backend *b, struct step *st, int first, int last, const int key[DSK_GRAPH_KEY], ds_err *e)
{
	graphs_check(b);
	int rc = graphable(b, st->T, first, last) ? dsk_graphs_run(b->graphs, key, b->s, step_body, st, e)
						  : step_body(st, e);
	graphs_check(b);
	return rc;
}

/* MTP layer 0 over the first Tc tokens of the main step `main` just ran
 * (its nc chained sequences come first): tokens from the main step's
 * argmax, hidden input its final-normed rows; their MTP argmax rows go to
 * ids. Then depth - 1 passes of one position a sequence (kernels/chain.h),
 * their argmaxes after those rows. The chained sequences are decode-sized:
 * all go through the split-KV kernel. */
static int chain_step(ds_backend *b, const struct step *main, int Tc, int nc, int depth, int mb, int32_t *ids,
		      ds_err *e)
{
	struct step st = *main;
	st.mtp = 1;
	st.T = st.rows = Tc;
	st.tok = b->amax;
	st.hin = b->of;
	const int n_pf = b->n_pf, n_short = b->n_short, li = b->m->n_layers, H = b->m->cfg.hidden_size;
	int32_t *crow = b->chn, *cpos = b->chn + b->cap_seqs;
	b->n_pf = 0;
	b->n_short = Tc;
	int rc = 0;
	/* The main step's inputs and argmax are overwritten below: where each
	 * sequence's accepted prefix ends goes first. */
	if (depth > 1)
		rc = dsk_chain_accept(crow, cpos, b->amax, b->tok, b->pos, b->seq, Tc, nc, b->s, e);
	const int key[DSK_GRAPH_KEY] = { 1, Tc, Tc, st.max_len, mb, 1 };
	if (!rc)
		rc = run_body(b, &st, li, li + 1, key, e);
	cudaError_t err;
	if (!rc && (err = cudaMemcpyAsync(ids, b->amax, sizeof(int32_t) * (size_t)Tc, cudaMemcpyDeviceToHost, b->s)) !=
			   cudaSuccess)
		rc = ds_cuda_cerr(e, err, "MTP argmax download");
	int32_t *out = ids + Tc;
	for (int k = 2; !rc && k <= depth; k++, out += nc) {
		b->n_short = nc;
		st.T = st.rows = nc;
		st.tok = b->tok;
		st.hin = b->hin;
		const int key2[DSK_GRAPH_KEY] = { 1, nc, nc, st.max_len, mb, 2 };
		if (!(rc = dsk_chain_next(b->tok, b->hin, b->pos, b->seq, b->amax, b->x, crow, cpos, k, nc, H, b->s, e)))
			rc = run_body(b, &st, li, li + 1, key2, e);
		if (!rc && (err = cudaMemcpyAsync(out, b->amax, sizeof(int32_t) * (size_t)nc, cudaMemcpyDeviceToHost,
						  b->s)) != cudaSuccess)
			rc = ds_cuda_cerr(e, err, "MTP argmax download");
	}
	b->n_pf = n_pf;
	b->n_short = n_short;
	return rc;
}

/* Positions sequence s of the step covers: its new ones, and for a chained
 * sequence the deeper MTP passes' up to depth - 1 beyond. */
static int seq_end(const ds_batch *bt, int s, int depth)
{
	return bt->pos0[s] + bt->n_new[s] + (s < bt->n_chain ? depth - 1 : 0);
}

static int forward(ds_backend *b, const ds_batch *bt, ds_step_out *out, ds_err *e)
{
	const ds_model *m = b->m;
	const ds_config *c = &m->cfg;
	const int H = c->hidden_size, V = c->vocab_size;
	int T = 0, max_len = 1, rc;
	const int depth = bt->chain_depth > 1 ? bt->chain_depth : 1;
	for (int s = 0; s < bt->n_seqs; s++) {
		if (bt->n_new[s] < 1 || bt->pos0[s] < 0 || bt->logits_from[s] < 0 || bt->logits_from[s] > bt->n_new[s])
			return ds_errf(e, -EINVAL, "cuda backend: bad batch entry %d", s);
		T += bt->n_new[s];
		int len = seq_end(bt, s, depth);
		if (len > max_len)
			max_len = len;
	}
	if (bt->n_seqs < 1)
		return ds_errf(e, -EINVAL, "cuda backend: empty batch");
	if (bt->mtp < 0 || bt->mtp > m->n_mtp)
		return ds_errf(e, -EINVAL, "cuda backend: MTP layer %d not in the model (%d)", bt->mtp, m->n_mtp);
	if (bt->mtp && !bt->hidden_in)
		return ds_errf(e, -EINVAL, "cuda backend: an MTP step needs hidden_in");
	int Tc = 0; /* tokens of the chained sequences (ds_batch.n_chain) */
	if (bt->n_chain) {
		if (depth > DS_MTP_MAX_AHEAD + 1)
			return ds_errf(e, -EINVAL, "cuda backend: chained drafting depth %d", depth);
		if (bt->mtp || bt->n_chain < 0 || bt->n_chain > bt->n_seqs || m->n_mtp < 1 || !out->mtp_argmax ||
		    !out->logits)
			return ds_errf(e, -EINVAL, "cuda backend: bad chained MTP step");
		for (int s = 0; s < bt->n_chain; s++) {
			if (bt->logits_from[s] != 0)
				return ds_errf(e, -EINVAL, "cuda backend: chained sequence %d needs all its logit rows", s);
			Tc += bt->n_new[s];
		}
		for (int r = 0; out->draw && r < Tc; r++)
			if (out->draw[r].temperature > 0)
				return ds_errf(e, -EINVAL, "cuda backend: chained rows take the argmax");
	}
	for (int t = 0; t < T; t++)
		if (bt->tokens[t] < 0 || bt->tokens[t] >= V)
			return ds_errf(e, -EINVAL, "cuda backend: token id %d outside the vocabulary (%d)", bt->tokens[t], V);
	for (int s = 0; s < bt->n_seqs; s++) {
		int nb = (seq_end(bt, s, depth) + b->block_tokens - 1) / b->block_tokens;
		for (int i = 0; i < nb; i++)
			if (bt->block_tables[s][i] < 0 || bt->block_tables[s][i] >= b->kv_blocks)
				return ds_errf(e, -EINVAL, "cuda backend: sequence %d names KV block %d of %d", s,
					       bt->block_tables[s][i], b->kv_blocks);
	}
	max_len = len_bucket(max_len);
	/* Block tables go up with a row stride fixed by the rounded length. */
	const int mb = (max_len + b->block_tokens - 1) / b->block_tokens;
	ds_cuda_mark(b, -1);
	const int ws_T = b->cap_T, ws_seqs = b->cap_seqs, ws_mb = b->cap_mb;
	TRY(ensure_ws(b, T, bt->n_seqs, mb, e));
	if (b->cap_T != ws_T || b->cap_seqs != ws_seqs || b->cap_mb != ws_mb)
		dsk_graphs_clear(b->graphs);
	if ((cudaSetDevice(b->dev)) != cudaSuccess)
		return ds_cuda_cerr(e, cudaGetLastError(), "set device");

	/* Token ids, positions, sequences, block tables and the logit rows go
	 * up in one staging buffer. */
	int32_t *hs = b->h_i32;
	const int Tp = dsk_gemm_pad(T);
	int32_t *h_tok = hs, *h_pos = hs + Tp, *h_seq = hs + 2 * Tp, *h_sel = hs + 3 * Tp, *h_tab = hs + 4 * Tp;
	int rows = 0;
	int32_t *h_list = hs + 4 * Tp + (size_t)b->cap_seqs * b->cap_mb;
	free(b->pf);
	b->pf = malloc(sizeof(*b->pf) * (size_t)bt->n_seqs);
	if (!b->pf)
		return -ENOMEM;
	b->n_pf = b->n_short = 0;
	for (int s = 0, t = 0; s < bt->n_seqs; s++) {
		const int len = bt->pos0[s] + bt->n_new[s];
		if (bt->n_new[s] >= PF_MIN_TOKENS && len <= 8192)
			b->pf[b->n_pf++] = (struct pf_seq){ .s = s, .t0 = t, .n = bt->n_new[s], .p0 = bt->pos0[s] };
		else
			for (int j = 0; j < bt->n_new[s]; j++)
				h_list[b->n_short++] = t + j;
		t += bt->n_new[s];
	}
	for (int s = 0, t = 0; s < bt->n_seqs; s++) {
		for (int j = 0; j < bt->n_new[s]; j++, t++) {
			h_tok[t] = bt->tokens[t];
			h_pos[t] = bt->pos0[s] + j;
			h_seq[t] = s;
			if (j >= bt->logits_from[s])
				h_sel[rows++] = t;
		}
		int nb = (seq_end(bt, s, depth) + b->block_tokens - 1) / b->block_tokens;
		memcpy(h_tab + (size_t)s * mb, bt->block_tables[s], sizeof(int32_t) * (size_t)nb);
	}
	if (!out->logits)
		rows = 0;
	const size_t lg_need = (size_t)dsk_gemm_pad(rows > 0 ? rows : 1) * V;
	if (lg_need > b->lg_cap) {
		cudaStreamSynchronize(b->s);
		cudaFree(b->lg);
		cudaFree(b->amax);
		cudaFree(b->drawp);
		cudaFreeHost(b->h_draw);
		b->amax = NULL;
		b->drawp = b->h_draw = NULL;
		b->lg_cap = 0;
		dsk_graphs_clear(b->graphs);
		const size_t nr = lg_need / V;
		if (cudaMalloc((void **)&b->lg, sizeof(float) * lg_need) != cudaSuccess ||
		    cudaMalloc((void **)&b->amax, sizeof(int32_t) * nr) != cudaSuccess ||
		    cudaMalloc((void **)&b->drawp, sizeof(dsk_draw) * nr) != cudaSuccess ||
		    cudaMallocHost((void **)&b->h_draw, sizeof(dsk_draw) * nr) != cudaSuccess) {
			cudaGetLastError();
			cudaFree(b->lg);
			b->lg = NULL;
			return ds_errf(e, -ENOMEM, "cuda backend: no GPU memory for %d logit rows", rows);
		}
		b->lg_cap = lg_need;
	}
	cudaError_t err;
#define UP(dst, src, n)                                                                                          \
	do {                                                                                                     \
		if ((err = cudaMemcpyAsync(dst, src, sizeof(int32_t) * (size_t)(n), cudaMemcpyHostToDevice, b->s)) != \
		    cudaSuccess)                                                                                 \
			return ds_cuda_cerr(e, err, "upload");                                                           \
	} while (0)
	UP(b->tok, h_tok, T);
	UP(b->pos, h_pos, T);
	UP(b->seq, h_seq, T);
	UP(b->sel_idx, h_sel, rows > 0 ? rows : 1);
	UP(b->tables, h_tab, (size_t)bt->n_seqs * mb);
	if (b->n_pf && b->n_short)
		UP(b->alist, h_list, b->n_short);
#undef UP
	/* How each logit row's token is chosen: argmax unless drawn. */
	if (rows > 0) {
		for (int r = 0; r < rows; r++) {
			const ds_draw *d = out->draw ? &out->draw[r] : NULL;
			b->h_draw[r] = d ? (dsk_draw){ .temperature = d->temperature, .top_p = d->top_p, .min_p = d->min_p,
						      .u = d->u, .top_k = d->top_k }
					 : (dsk_draw){ .temperature = 0 };
		}
		if ((err = cudaMemcpyAsync(b->drawp, b->h_draw, sizeof(dsk_draw) * (size_t)rows, cudaMemcpyHostToDevice,
					   b->s)) != cudaSuccess)
			return ds_cuda_cerr(e, err, "draw upload");
	}
	if (bt->mtp && (err = cudaMemcpyAsync(b->hin, bt->hidden_in, sizeof(float) * (size_t)T * H,
					      cudaMemcpyHostToDevice, b->s)) != cudaSuccess)
		return ds_cuda_cerr(e, err, "hidden_in upload");
	struct step st = { .b = b, .mtp = bt->mtp, .T = T, .rows = rows, .max_len = max_len,
			   .geo = { .pool = b->kv, .block_stride = (long)b->kv_block_stride,
				    .layer_stride = (long)b->kv_layer_stride, .block_tokens = b->block_tokens,
				    .tables = b->tables, .max_blocks = mb },
			   .tok = b->tok, .hin = b->hin };
	const int first = bt->mtp ? m->n_layers + bt->mtp - 1 : 0, last = bt->mtp ? first + 1 : m->n_layers;
	const int key[DSK_GRAPH_KEY] = { bt->mtp, T, rows, max_len, mb, 0 };
	if ((rc = run_body(b, &st, first, last, key, e)))
		return rc;
	if (out->hidden) {
		const float *src = bt->mtp ? b->x : b->of;
		if ((err = cudaMemcpyAsync(out->hidden, src, sizeof(float) * (size_t)T * H, cudaMemcpyDeviceToHost, b->s)) !=
		    cudaSuccess)
			return ds_cuda_cerr(e, err, "hidden download");
	}
	if (rows > 0 && out->argmax &&
	    (err = cudaMemcpyAsync(out->argmax, b->amax, sizeof(int32_t) * (size_t)rows, cudaMemcpyDeviceToHost,
				   b->s)) != cudaSuccess)
		return ds_cuda_cerr(e, err, "argmax download");
	/* Logit rows the caller needs, in runs of consecutive rows; a drawn
	 * row holds probabilities now. */
#define NEEDED(r) ((!out->need || out->need[r]) && b->h_draw[r].temperature == 0)
	for (int r0 = 0; r0 < rows;) {
		if (!NEEDED(r0)) {
			r0++;
			continue;
		}
		int r1 = r0 + 1;
		while (r1 < rows && NEEDED(r1))
			r1++;
		if ((err = cudaMemcpyAsync(out->logits + (size_t)r0 * V, b->lg + (size_t)r0 * V,
					   sizeof(float) * (size_t)(r1 - r0) * V, cudaMemcpyDeviceToHost, b->s)) !=
		    cudaSuccess)
			return ds_cuda_cerr(e, err, "logits download");
		r0 = r1;
	}
#undef NEEDED
	/* The chained MTP step reuses amax, lg and of, and overwrites them: the
	 * downloads above are queued before it on the same stream. */
	if (Tc && (rc = chain_step(b, &st, Tc, bt->n_chain, depth, mb, out->mtp_argmax, e)))
		return rc;
	if ((err = cudaStreamSynchronize(b->s)) != cudaSuccess)
		return ds_cuda_cerr(e, err, "step");
	ds_cuda_mark(b, 7);
	return 0;
}

static int kv_copy(ds_backend *b, int32_t dst, int32_t src)
{
	if (dst < 0 || src < 0 || dst >= b->kv_blocks || src >= b->kv_blocks)
		return -EINVAL;
	cudaError_t err = cudaMemcpyAsync(b->kv + (size_t)dst * b->kv_block_stride, b->kv + (size_t)src * b->kv_block_stride,
					  sizeof(dsk_bf16) * b->kv_block_stride, cudaMemcpyDeviceToDevice, b->s);
	if (err == cudaSuccess)
		err = cudaStreamSynchronize(b->s);
	return err == cudaSuccess ? 0 : -EIO;
}

const ds_backend_ops ds_cuda_backend = {
	.name = "cuda",
	.create = create,
	.destroy = destroy,
	.forward = forward,
	.kv_copy = kv_copy,
	.weight_bytes = weight_bytes,
	.expert_load = expert_load,
	.draws = 1,
	.chain = 1,
};

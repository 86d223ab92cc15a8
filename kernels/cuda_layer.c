/* cuda_layer.c — one decoder layer's launches on the CUDA backend (see
 * cuda_internal.h): MLA (projections, prep, split-KV attention, the flash
 * or GEMM prefill attention, W_UV, o_proj), the MoE (shared experts beside
 * the router, the device-planned grouped GEMVs or grouped GEMMs, or the
 * host-planned GEMMs, the combine with the next norm) or the dense MLP. All
 * launches go to the backend's streams; nothing here synchronizes except the
 * host-planned experts' row offsets (layers the grouped GEMMs do not take,
 * or DS_CUDA_MOE_HOST_PLAN=1). */
#include <cuda_runtime_api.h>
#include <errno.h>

#include "kernels/act.h"
#include "kernels/attn.h"
#include "kernels/cuda_internal.h"
#include "kernels/flash.h"
#include "kernels/gemm.h"
#include "kernels/gemv.h"
#include "kernels/moe.h"
#include "kernels/moe_gemm.h"
#include "kernels/norm.h"
#include "kernels/rope.h"

int ds_cuda_gemm(ds_backend *b, float *out, int ldo, const dsk_bf16 *x, int M, const dsk_weight *W, ds_err *e)
{
	return dsk_gemm_run(b->gemm, out, ldo, x, M, W, e);
}

/* Where a norm writes the FP8 copy of its rows (dim wide) for the FP8
 * GEMVs and expert GEMVs that read them: steps of FP8 models as many tokens
 * as the GEMV takes (one launch fewer per reader: 1-3 % at batch 1, 5-7 %
 * at batch 4-8 since the dense projections of up to 16 rows are GEMVs too,
 * docs/PERFORMANCE.md). NULL: no copy; the consumers quantize for themselves. */
#ifndef NORM_Q_MAX_T
#define NORM_Q_MAX_T DSK_GEMV_MAX_M
#endif
static const dsk_qout *norm_q(const ds_backend *b, int T, int dim, dsk_qout *qo)
{
	if (!b->preq || T > NORM_Q_MAX_T || T > b->dev_moe_max_t || dim % 128)
		return NULL;
	*qo = (dsk_qout){ b->qn, b->qns, dsk_gemm_pad(T) };
	return qo;
}

/* For a norm about to write xn: its FP8 copy too, unless this is the final
 * norm (of: the LM head reads bf16); xn_q records which. */
static const dsk_qout *xn_qout(ds_backend *b, int T, const float *of, dsk_qout *qo)
{
	const dsk_qout *q = of ? NULL : norm_q(b, T, b->m->cfg.hidden_size, qo);
	b->xn_q = q != NULL;
	return q;
}

int ds_cuda_norm_xn(ds_backend *b, float *x, const float *y, const float *w, int T, float *of, ds_err *e)
{
	const ds_config *c = &b->m->cfg;
	dsk_qout qo;
	return dsk_add_rmsnorm(x, y, w, T, c->hidden_size, c->rms_norm_eps, b->xn, c->hidden_size, of,
			       xn_qout(b, T, of, &qo), b->s, e);
}

/* GEMMs on gm over x (M rows) read the norm's FP8 copy when there is one;
 * forgotten right after, as x (xn) is rewritten by every block. */
static void pre_on(ds_backend *b, dsk_gemm *gm, const dsk_bf16 *x, int M, int have)
{
	if (have)
		dsk_gemm_prequant(gm, x, M, b->qn, b->qns);
}

static void pre_off(dsk_gemm *gm) { dsk_gemm_prequant(gm, NULL, 0, NULL, NULL); }

/* A dense MLP on the GEMM handle gm (and its stream s): gate, up and SiLU in
 * one GEMV launch where it takes the shapes. */
static int mlp(dsk_gemm *gm, cudaStream_t s, const dsk_weight *g, const dsk_weight *u, const dsk_weight *d,
	       const dsk_bf16 *x, int M, float *gb, float *ub, dsk_bf16 *hb, float *out, ds_err *e)
{
	const int I = g->rows;
	int rc = dsk_gemm_glu(gm, hb, I, x, M, g, u, e);
	if (rc == -ENOTSUP) {
		TRY(dsk_gemm_run(gm, gb, I, x, M, g, e));
		TRY(dsk_gemm_run(gm, ub, I, x, M, u, e));
		rc = dsk_silu_mul(hb, gb, ub, dsk_gemm_pad(M), I, s, e);
	}
	TRY(rc);
	return dsk_gemm_run(gm, out, d->rows, hb, M, d, e);
}

static int blas_err(ds_err *e, cublasStatus_t st, const char *what)
{
	return st == CUBLAS_STATUS_SUCCESS ? 0 : ds_errf(e, -EIO, "cublas: %s: status %d", what, (int)st);
}

/* Queries per pass of the GEMM prefill attention: a pass scores only the
 * keys up to its last query (causal), so smaller passes skip more of the
 * masked half (512 of 4096: 56 % of the full square is computed). */
#define PF_QCHUNK 512

/* The prefill workspace: need bytes in b->pf_buf (grown, never shrunk). */
static int pf_reserve(ds_backend *b, size_t need, int n, ds_err *e)
{
	if (need <= b->pf_cap)
		return 0;
	cudaStreamSynchronize(b->s);
	cudaFree(b->pf_buf);
	b->pf_buf = NULL;
	b->pf_cap = 0;
	if (cudaMalloc(&b->pf_buf, need) != cudaSuccess) {
		cudaGetLastError();
		return ds_errf(e, -ENOMEM, "cuda backend: no GPU memory for a %d-token prefill (%zu MiB)", n, need >> 20);
	}
	b->pf_cap = need;
	return 0;
}

/* A long prompt chunk of one sequence in one kernel a group of heads
 * (kernels/flash.h): the sequence's latent rows gathered, each head's keys
 * and values [W_UK_h c ; W_UV_h c] by one batched GEMM (at most 512 MiB of
 * them), then the flash kernel writes o for the chunk's tokens. */
static int prefill_flash(ds_backend *b, int li, const struct pf_seq *p, const dsk_kv_geom *geo, ds_err *e)
{
	const ds_config *c = &b->m->cfg;
	const dlayer *d = &b->L[li];
	const int nh = c->num_attention_heads, nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim;
	const int qk = nope + rope, kvl = c->kv_lora_rank, kvd = kvl + rope, vd = c->v_head_dim, kw = nope + vd;
	const int len = p->p0 + p->n;
	const size_t head_bytes = (size_t)len * kw * 2, kc_bytes = (size_t)len * kvd * 2;
	int hc = (int)(((size_t)512 << 20) / head_bytes), rc;
	hc = hc < 1 ? 1 : hc > nh ? nh : hc;
	const size_t kv_bytes = ((size_t)hc * head_bytes + 255) & ~(size_t)255;
	TRY(pf_reserve(b, kv_bytes + kc_bytes + 1024, p->n, e));
	dsk_bf16 *kv = b->pf_buf, *kc = (dsk_bf16 *)((char *)b->pf_buf + kv_bytes);
	TRY(dsk_kv_gather(geo, li, geo->tables + (size_t)p->s * geo->max_blocks, len, kvd, kc, b->s, e));
	const float one = 1.0f, zero = 0.0f;
	for (int h0 = 0; h0 < nh; h0 += hc) {
		const int hn = nh - h0 < hc ? nh - h0 : hc;
		/* kv_h [len][nope + vd] = c [len][kvl] kv_b_h^T (kv_b_h: rows h (nope + vd) ..) */
		cublasStatus_t st = cublasGemmStridedBatchedEx(
			b->blas, CUBLAS_OP_T, CUBLAS_OP_N, kw, len, kvl, &one, d->kvb + (size_t)h0 * kw * kvl, CUDA_R_16BF,
			kvl, (long long)kw * kvl, kc, CUDA_R_16BF, kvd, 0, &zero, kv, CUDA_R_16BF, kw, (long long)len * kw,
			hn, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
		TRY(blas_err(e, st, "prefill keys and values"));
		dsk_flash_args a = { .q = b->qb + ((size_t)p->t0 * nh + h0) * qk, .kv = kv, .kpe = kc + kvl,
				     .o = b->o + ((size_t)p->t0 * nh + h0) * vd, .q_ld = nh * qk, .kpe_ld = kvd,
				     .o_ld = nh * vd, .nh = hn, .nope = nope, .rope = rope, .vd = vd, .n = p->n,
				     .len = len, .p0 = p->p0, .scale = b->softmax_scale };
		TRY(dsk_flash_prefill(&a, b->s, e));
	}
	return 0;
}

/* The same through cuBLAS and a softmax pass (head shapes the flash kernel
 * lacks, and DS_CUDA_FLASH=0), heads in groups of hc: the keys' non-absorbed
 * nope part k_h = W_UK_h c for the group, then per pass of queries the
 * scores q_nope k_h + q_pe k_pe (192-wide dot products instead of the
 * absorbed form's 576), the causal softmax, and the latent sum lat = P c as
 * in decode (o = W_UV lat follows for all tokens). */
static int prefill_gemm(ds_backend *b, int li, const struct pf_seq *p, const dsk_kv_geom *geo, ds_err *e)
{
	const ds_config *c = &b->m->cfg;
	const dlayer *d = &b->L[li];
	const int nh = c->num_attention_heads, nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim;
	const int qk = nope + rope, kvl = c->kv_lora_rank, kvd = kvl + rope, vd = c->v_head_dim;
	const int n = p->n, len = p->p0 + p->n, qn = n < PF_QCHUNK ? n : PF_QCHUNK;
	int hc = (int)(((size_t)512 << 20) / ((size_t)qn * len * 4));
	hc = hc < 1 ? 1 : hc > nh ? nh : hc;
	const size_t s_bytes = (size_t)hc * qn * len * 4, kn_bytes = (size_t)hc * len * nope * 2,
		     kc_bytes = (size_t)len * kvd * 2;
	int rc;
	TRY(pf_reserve(b, s_bytes + ((kn_bytes + 255) & ~(size_t)255) + kc_bytes + 1024, n, e));
	float *S = b->pf_buf;
	dsk_bf16 *kn = (dsk_bf16 *)((char *)b->pf_buf + s_bytes);
	dsk_bf16 *kc = (dsk_bf16 *)((char *)kn + ((kn_bytes + 255) & ~(size_t)255));
	TRY(dsk_kv_gather(geo, li, geo->tables + (size_t)p->s * geo->max_blocks, len, kvd, kc, b->s, e));
	const float one = 1.0f, zero = 0.0f;
	cublasStatus_t st;
	for (int h0 = 0; h0 < nh; h0 += hc) {
		const int hn = nh - h0 < hc ? nh - h0 : hc;
		/* kn_h [len][nope] = c [len][kvl] W_UK_h^T (W_UK_h: rows h (nope + vd) .. of kv_b) */
		st = cublasGemmStridedBatchedEx(b->blas, CUBLAS_OP_T, CUBLAS_OP_N, nope, len, kvl, &one,
						d->kvb + (size_t)h0 * (nope + vd) * kvl, CUDA_R_16BF, kvl,
						(long long)(nope + vd) * kvl, kc, CUDA_R_16BF, kvd, 0, &zero, kn, CUDA_R_16BF,
						nope, (long long)len * nope, hn, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
		TRY(blas_err(e, st, "prefill keys"));
		for (int i0 = 0; i0 < n; i0 += qn) {
			const int m = n - i0 < qn ? n - i0 : qn, lc = p->p0 + i0 + m;
			const dsk_bf16 *qh = b->qb + ((size_t)(p->t0 + i0) * nh + h0) * qk;
			/* S_h^T (lc x m) = kn_h (lc x nope) q_nope_h^T, then += k_pe (lc x rope) q_pe_h^T */
			st = cublasGemmStridedBatchedEx(b->blas, CUBLAS_OP_T, CUBLAS_OP_N, lc, m, nope, &one, kn, CUDA_R_16BF,
							nope, (long long)len * nope, qh, CUDA_R_16BF, nh * qk, qk, &zero, S,
							CUDA_R_32F, lc, (long long)lc * m, hn, CUBLAS_COMPUTE_32F,
							CUBLAS_GEMM_DEFAULT);
			TRY(blas_err(e, st, "prefill scores"));
			st = cublasGemmStridedBatchedEx(b->blas, CUBLAS_OP_T, CUBLAS_OP_N, lc, m, rope, &one, kc + kvl,
							CUDA_R_16BF, kvd, 0, qh + nope, CUDA_R_16BF, nh * qk, qk, &one, S,
							CUDA_R_32F, lc, (long long)lc * m, hn, CUBLAS_COMPUTE_32F,
							CUBLAS_GEMM_DEFAULT);
			TRY(blas_err(e, st, "prefill rope scores"));
			TRY(dsk_causal_softmax(S, hn * m, lc, m, p->p0 + i0, b->softmax_scale, b->s, e));
			/* lat_h (kvl x m) = c^T (kvl x lc) P_h (lc x m) */
			st = cublasGemmStridedBatchedEx(b->blas, CUBLAS_OP_N, CUBLAS_OP_N, kvl, m, lc, &one, kc, CUDA_R_16BF,
							kvd, 0, (const dsk_bf16 *)S, CUDA_R_16BF, 2 * lc, 2LL * lc * m, &zero,
							b->lat + ((size_t)(p->t0 + i0) * nh + h0) * kvl, CUDA_R_16BF, nh * kvl,
							kvl, hn, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
			TRY(blas_err(e, st, "prefill latent sum"));
		}
	}
	return 0;
}

static int attention(ds_backend *b, int li, int T, int max_len, const dsk_kv_geom *geo, ds_err *e)
{
	const ds_config *c = &b->m->cfg;
	const dlayer *d = &b->L[li];
	const int nh = c->num_attention_heads, nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim;
	const int qk = nope + rope, vd = c->v_head_dim, kvl = c->kv_lora_rank, kvd = kvl + rope;
	int rc;
	/* The projections of xn share one GEMV launch at decode sizes. */
	pre_on(b, b->gemm, b->xn, T, b->xn_q);
	if (c->q_lora_rank > 0) {
		rc = dsk_gemm_run2(b->gemm, b->qa, c->q_lora_rank, &d->q_a, b->kvx, kvd, &d->kv_a, b->xn, T, e);
		pre_off(b->gemm);
		TRY(rc);
		/* xn's FP8 copy is read by now (stream order): q_a's takes its place. */
		dsk_qout qo;
		const dsk_qout *q = d->q_b.type == DSK_W_FP8 ? norm_q(b, T, c->q_lora_rank, &qo) : NULL;
		TRY(dsk_add_rmsnorm(b->qa, NULL, d->q_a_norm, T, c->q_lora_rank, c->rms_norm_eps, b->qan, c->q_lora_rank,
				    NULL, q, b->s, e));
		pre_on(b, b->gemm, b->qan, T, q != NULL);
		rc = ds_cuda_gemm(b, b->q, nh * qk, b->qan, T, &d->q_b, e);
		pre_off(b->gemm);
		TRY(rc);
	} else {
		rc = dsk_gemm_run2(b->gemm, b->q, nh * qk, &d->q_proj, b->kvx, kvd, &d->kv_a, b->xn, T, e);
		pre_off(b->gemm);
		TRY(rc);
	}
	/* Few tokens: the W_UK absorption rides in the prep launch (its weights
	 * read once for all tokens); more: one batched GEMM per step, for the
	 * split-KV kernel's tokens (the flash kernel does not read qabs). */
	const int fused = T <= DSK_ABSORB_MAX_T && dsk_mla_absorb_ok(nope, kvl);
	const int flash = b->n_pf && b->flash;
	TRY(dsk_mla_prep(geo, li, b->kvx, d->kv_a_norm, c->rms_norm_eps, b->q, b->qb, nh, nope, rope, kvl, b->inv_freq,
			 b->attn_factor, b->seq, b->pos, T, fused ? d->kvb : NULL, vd, b->qabs, b->s, e));
	const float one = 1.0f, zero = 0.0f;
	cublasStatus_t st;
	if (!fused && (b->n_short || !flash)) {
		/* qabs[t][h] = W_UK_h^T q_nope[t][h]: per head, (kvl x nope) * (nope x T). */
		st = cublasGemmStridedBatchedEx(b->blas, CUBLAS_OP_N, CUBLAS_OP_N, kvl, T, nope, &one, d->kvb,
						CUDA_R_16BF, kvl, (long long)(nope + vd) * kvl, b->qb, CUDA_R_16BF,
						nh * qk, qk, &zero, b->qabs, CUDA_R_32F, nh * kvl, kvl, nh,
						CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
		TRY(blas_err(e, st, "W_UK absorption"));
	}
	ds_cuda_mark(b, 1);
	for (int k = 0; k < b->n_pf && !flash; k++)
		TRY(prefill_gemm(b, li, &b->pf[k], geo, e));
	if (b->n_short > 0) {
		const int nsplit = dsk_attn_splits(b->n_short, nh, max_len, b->sms);
		dsk_attn_args a = { .g = *geo, .layer = li, .q = b->q, .qabs = b->qabs, .nh = nh, .nope = nope,
				    .rope = rope, .kvl = kvl, .seq = b->seq, .pos = b->pos, .T = T, .max_len = max_len,
				    .scale = b->softmax_scale, .ws = b->attn_ws, .lat = b->lat,
				    .list = b->n_pf ? b->alist : NULL, .n_list = b->n_short };
		int ns = nsplit;
		while (ns > 1 && dsk_attn_ws_floats(T, nh, kvl, ns) > b->attn_ws_n)
			ns--;
		TRY(dsk_mla_attention(&a, ns, b->s, e));
	}
	if (!flash)
		ds_cuda_mark(b, 2);
	/* o[t][h] = W_UV_h lat[t][h]: per head, (vd x kvl) * (kvl x T); for 1-2
	 * tokens a GEMV whose weights stream while the merge finishes (cuBLAS's
	 * kernels do not let the next launch start early). (In the merge kernel
	 * for few tokens this measured slower: 14.7 us against 6.0 + 5.2 on
	 * V2-Lite at batch 1.) With the flash kernel this runs for the short
	 * tokens' rows only where there are some (over all T rows: the flash
	 * kernel writes its rows of o after it). */
	rc = 0;
	if (!flash || b->n_short) {
		rc = dsk_gemv_heads(b->o, d->kvb + (size_t)nope * kvl, (long)(nope + vd) * kvl, b->lat, T, nh, vd, kvl,
				    b->s, e);
		if (rc == -ENOTSUP) {
			st = cublasGemmStridedBatchedEx(b->blas, CUBLAS_OP_T, CUBLAS_OP_N, vd, T, kvl, &one,
							d->kvb + (size_t)nope * kvl, CUDA_R_16BF, kvl,
							(long long)(nope + vd) * kvl, b->lat, CUDA_R_16BF, nh * kvl, kvl, &zero,
							b->o, CUDA_R_16BF, nh * vd, vd, nh, CUBLAS_COMPUTE_32F,
							CUBLAS_GEMM_DEFAULT);
			rc = blas_err(e, st, "W_UV");
		}
	}
	for (int k = 0; k < b->n_pf && flash && !rc; k++)
		rc = prefill_flash(b, li, &b->pf[k], geo, e);
	if (flash)
		ds_cuda_mark(b, 2);
	TRY(rc);
	rc = ds_cuda_gemm(b, b->y, c->hidden_size, b->o, T, &d->o_proj, e);
	ds_cuda_mark(b, 3);
	return rc;
}

static int moe_host_planned(ds_backend *b, const dlayer *d, int T, ds_err *e);

/* Whether layer d's routed experts take the grouped GEMMs of
 * kernels/moe_gemm.h over a plan of at most rows rows: one type for gate/up
 * and down, FP8 in whole scale blocks. */
static int grouped_ok(const ds_backend *b, const dlayer *d, int rows)
{
	const ds_config *c = &b->m->cfg;
	const int H = c->hidden_size, E = c->n_routed_experts, I = c->moe_intermediate_size;
	return b->moe_gemm && d->dev_moe && d->moe_fp8 == d->moe_fp8_down && dsk_moe_gemm_ok(E, I, H) &&
	       dsk_moe_gemm_ok(E, H, I) && (!d->moe_fp8 || (H % 128 == 0 && I % 128 == 0 && rows % 4 == 0));
}

/* The routed experts in two grouped launches over the plan in b->off (at
 * most rows rows): SiLU(gate) * up into hp, then down into yp. x holds the
 * plan's rows in order, or with row_src the rows they read by index; FP8: x
 * is quantized (scales b->qxs, row stride xs_ld), and hp's plan rows are
 * quantized into b->qx between the two. */
static int moe_grouped(ds_backend *b, const dlayer *d, const void *x, const int32_t *row_src, int xs_ld, int rows,
		       ds_err *e)
{
	const ds_config *c = &b->m->cfg;
	const int H = c->hidden_size, E = c->n_routed_experts, I = c->moe_intermediate_size, fp8 = d->moe_fp8;
	int rc;
	dsk_moe_gemm_args g = { .x = x, .row_src = row_src, .off = b->off, .w0 = (const void *const *)d->ew[0],
				.w1 = (const void *const *)d->ew[1], .out = b->hp, .E = E, .N = I, .K = H, .ldo = I,
				.max_rows = rows, .fp8 = fp8, .xs = b->qxs, .xs_ld = xs_ld,
				.s0 = (const float *const *)d->es[0], .s1 = (const float *const *)d->es[1],
				.sld = d->esld[0] };
	TRY(dsk_moe_gemm(&g, 1, b->s, e));
	if (fp8)
		TRY(dsk_quant_fp8_dev(b->qx, b->qxs, b->hp, b->off + E, rows, I, b->s, e));
	g = (dsk_moe_gemm_args){ .x = fp8 ? (const void *)b->qx : b->hp, .off = b->off,
				 .w0 = (const void *const *)d->ew[2], .out = b->yp, .E = E, .N = H, .K = I, .ldo = H,
				 .max_rows = rows, .fp8 = fp8, .xs = b->qxs, .xs_ld = rows,
				 .s0 = (const float *const *)d->es[2], .sld = d->esld[2] };
	return dsk_moe_gemm(&g, 0, b->s, e);
}


static int moe(ds_backend *b, int li, int T, const struct next_norm *nn, ds_err *e)
{
	const ds_config *c = &b->m->cfg;
	const dlayer *d = &b->L[li];
	const int H = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
	const int I = c->moe_intermediate_size;
	int rc;
	/* The shared experts need only xn: they run on the side stream while
	 * the router, the plan and the routed experts run here. */
	const float *shared = NULL;
	if (c->n_shared_experts > 0) {
		cudaError_t err = cudaEventRecord(b->ev_fork, b->s);
		if (err == cudaSuccess)
			err = cudaStreamWaitEvent(b->s2, b->ev_fork, 0);
		if (err != cudaSuccess)
			return ds_cuda_cerr(e, err, "fork");
		pre_on(b, b->gemm2, b->xn, T, b->xn_q);
		rc = mlp(b->gemm2, b->s2, &d->sh_gate, &d->sh_up, &d->sh_down, b->xn, T, b->g, b->u, b->h, b->ysh, e);
		pre_off(b->gemm2);
		TRY(rc);
		if ((err = cudaEventRecord(b->ev_join, b->s2)) != cudaSuccess)
			return ds_cuda_cerr(e, err, "join");
		shared = b->ysh;
	}
	TRY(ds_cuda_gemm(b, b->logits_r, E, b->xn, T, &d->router, e));
	dsk_route_cfg rcfg = { .E = E, .K = K, .n_group = c->n_group, .topk_group = c->topk_group,
			       .sigmoid = c->scoring_func == DS_SCORE_SIGMOID, .method = (int)c->topk_method,
			       .norm_topk = c->norm_topk_prob, .scale = c->routed_scaling_factor };
	TRY(dsk_moe_route_plan(&rcfg, b->logits_r, d->router_bias, T, b->ids, b->moe_w, b->cnt, b->off, b->ppos,
			       b->row_tok, b->act, b->eload ? b->eload + (size_t)li * E : NULL, b->moe_rows, b->s, e));
	const int max_act = T * K < E ? T * K : E;
	/* Rows the expert GEMV takes per pass: about twice the mean rows per
	 * expert (an expert with more takes another pass over its weights). */
	int mr = (2 * T * K + E - 1) / E;
	mr = mr > T ? T : mr;
	/* the plan's row bound, a multiple of 4: the FP8 scales' row stride
	 * (16-byte aligned columns, grouped_ok) */
	const int Pn = (T * K + 15 * E + 3) & ~3;
	/* Steps with enough rows an expert: the grouped GEMMs on the device plan
	 * (no gather: plan rows read their token's row of xn, or of its FP8
	 * copy, by index), no host round trip, so a decode step stays a graph
	 * and a prefill step does not wait on the host each layer. Decode-sized
	 * FP8 experts stay on the GEMVs unless b->moe_gemm_fp8_dev: the FP8
	 * grouped kernel (one block an SM) lost to them at V2-Lite's batch 256
	 * (ids 19.7 -> 23.4 ms, H100). Larger steps took the host-planned path
	 * (offsets to the host, gather) before; b->moe_host_plan keeps that. */
	const int large = T > b->dev_moe_max_t;
	if (d->dev_moe && T * K >= b->moe_gemm_min_rows * E && grouped_ok(b, d, Pn) &&
	    (large ? !b->moe_host_plan : !d->moe_fp8 || b->moe_gemm_fp8_dev)) {
		const int Tp = dsk_gemm_pad(T);
		ds_cuda_mark(b, 4);
		if (d->moe_fp8)
			TRY(dsk_quant_fp8(b->qx, b->qxs, b->xn, Tp, H, b->s, e));
		TRY(moe_grouped(b, d, d->moe_fp8 ? (const void *)b->qx : b->xn, b->row_tok, Tp, Pn, e));
	} else if (d->dev_moe && T <= b->dev_moe_max_t) {
		/* Decode-sized steps: grouped GEMVs read the plan on the device. */
		const int Tp = dsk_gemm_pad(T);
		dsk_moe_gemv_args g = { .out = b->hp, .ldo = I, .x = b->xn, .xs = b->qxs, .xs_ld = Tp,
					.row_src = b->row_tok, .off = b->off, .cnt = b->cnt, .act = b->act,
					.max_active = max_act, .max_rows = mr,
					.wp = { (const void *const *)d->ew[0], (const void *const *)d->ew[1] },
					.sp = { (const float *const *)d->es[0], (const float *const *)d->es[1] },
					.sld = d->esld[0], .fp8 = d->moe_fp8, .glu = 1, .N = I, .K = H };
		if (d->moe_fp8 && b->xn_q) {
			g.x = b->qn; /* the norm's copy (read by the shared experts too) */
			g.xs = b->qns;
		} else if (d->moe_fp8) {
			TRY(dsk_quant_fp8(b->qx, b->qxs, b->xn, Tp, H, b->s, e));
			g.x = b->qx;
		}
		ds_cuda_mark(b, 4);
		TRY(dsk_moe_gemv(&g, b->s, e));
		g.out = b->yp;
		g.ldo = H;
		g.x = b->hp;
		g.xs = b->qxs;
		g.xs_ld = Pn;
		g.row_src = NULL;
		g.wp[0] = (const void *const *)d->ew[2];
		g.sp[0] = (const float *const *)d->es[2];
		g.sld = d->esld[2];
		g.glu = 0;
		g.N = H;
		g.K = I;
		g.fp8 = d->moe_fp8_down;
		if (d->moe_fp8_down) {
			/* Only the plan's rows (b->off[E] of at most Pn). */
			TRY(dsk_quant_fp8_dev(b->qx, b->qxs, b->hp, b->off + E, Pn, I, b->s, e));
			g.x = b->qx;
		}
		TRY(dsk_moe_gemv(&g, b->s, e));
	} else {
		TRY(moe_host_planned(b, d, T, e));
	}
	ds_cuda_mark(b, 5);
	if (shared) {
		cudaError_t err = cudaStreamWaitEvent(b->s, b->ev_join, 0);
		if (err != cudaSuccess)
			return ds_cuda_cerr(e, err, "join");
	}
	/* The combine joins the residual and feeds the next norm (nn). */
	dsk_qout qo;
	rc = dsk_combine_add_rmsnorm(b->x, shared, b->yp, b->ppos, b->moe_w, K, nn->w, T, H, c->rms_norm_eps, b->xn, H,
				     nn->of, xn_qout(b, T, nn->of, &qo), b->s, e);
	ds_cuda_mark(b, 6);
	return rc;
}

/* Larger steps: the row offsets come back to the host; bf16 experts run as
 * two grouped launches (kernels/moe_gemm.h), others each as a GEMM triple
 * (cuBLASLt, or the GEMV for few rows). */
static int moe_host_planned(ds_backend *b, const dlayer *d, int T, ds_err *e)
{
	const ds_config *c = &b->m->cfg;
	const int H = c->hidden_size, E = c->n_routed_experts, I = c->moe_intermediate_size;
	int rc;
	(void)T;
	int32_t *hoff = b->h_i32;
	cudaError_t err = cudaMemcpyAsync(hoff, b->off, sizeof(int32_t) * (size_t)(E + 1), cudaMemcpyDeviceToHost, b->s);
	if (err == cudaSuccess)
		err = cudaStreamSynchronize(b->s);
	if (err != cudaSuccess)
		return ds_cuda_cerr(e, err, "moe plan");
	const int P = hoff[E];
	ds_cuda_mark(b, 4);
	TRY(dsk_moe_gather(b->xp, b->xn, b->row_tok, P, H, b->s, e));
	if (grouped_ok(b, d, P)) {
		/* FP8: the plan's rows quantized once (not once an expert and weight) */
		if (d->moe_fp8)
			TRY(dsk_quant_fp8(b->qx, b->qxs, b->xp, P, H, b->s, e));
		return moe_grouped(b, d, d->moe_fp8 ? (const void *)b->qx : b->xp, NULL, P, P, e);
	}
	/* Every expert's gate and up, one SiLU-mul over all P rows (the
	 * experts' row ranges tile them, padding rows included: their zero
	 * inputs give zeros), then the down projections: one launch a layer
	 * instead of one an expert (64 a layer took ~7 us each at prefill). */
	for (int x = 0; x < E; x++) {
		const int r0 = hoff[x], n = hoff[x + 1] - r0;
		if (n == 0)
			continue;
		/* gate and up on one quantization of the expert's rows (FP8) */
		TRY(dsk_gemm_run2(b->gemm, b->gp + (size_t)r0 * I, I, &d->eg[x], b->up + (size_t)r0 * I, I, &d->eu[x],
				  b->xp + (size_t)r0 * H, n, e));
	}
	TRY(dsk_silu_mul(b->hp, b->gp, b->up, P, I, b->s, e));
	for (int x = 0; x < E; x++) {
		const int r0 = hoff[x], n = hoff[x + 1] - r0;
		if (n == 0)
			continue;
		TRY(ds_cuda_gemm(b, b->yp + (size_t)r0 * H, H, b->hp + (size_t)r0 * I, n, &d->ed[x], e));
	}
	return 0;
}

/* A decoder block from the normed input in xn to the normed input of what
 * follows (nn) in xn; x carries the residual stream. */
int ds_cuda_block(ds_backend *b, int li, int T, int max_len, const dsk_kv_geom *geo, const struct next_norm *nn,
		  ds_err *e)
{
	const dlayer *d = &b->L[li];
	int rc;
	TRY(attention(b, li, T, max_len, geo, e));
	TRY(ds_cuda_norm_xn(b, b->x, b->y, d->post_norm, T, NULL, e));
	if (b->m->layers[li].is_moe)
		return moe(b, li, T, nn, e);
	pre_on(b, b->gemm, b->xn, T, b->xn_q);
	rc = mlp(b->gemm, b->s, &d->gate, &d->up, &d->down, b->xn, T, b->g, b->u, b->h, b->y, e);
	pre_off(b->gemm);
	TRY(rc);
	rc = ds_cuda_norm_xn(b, b->x, b->y, nn->w, T, nn->of, e);
	ds_cuda_mark(b, 6);
	return rc;
}

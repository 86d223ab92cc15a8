/* gemv.h — weight-streaming GEMVs for decode-sized steps: one warp per
 * output row reads its weight row (bf16, or FP8 e4m3 with 128x128 block
 * scales) with 16-byte loads, for a few activation rows (bf16, or FP8
 * quantized per 1x128 group by dsk_quant_fp8: the same function as the
 * block-scaled GEMM). A launch can take two weights sharing the input (two
 * projections of the same rows), or a gate and an up weight, writing
 * h = bf16(silu(gate) * up) (the MLP's first half in one pass). The MoE
 * variant reads the plan on the device (no count goes back to the host). */
#ifndef DSK_GEMV_H
#define DSK_GEMV_H

#include "kernels/dsk.h"

/* The most rows the dense GEMV takes: 1-2 rows a warp per weight row, 3-16
 * on the tensor cores (16 weight rows a warp); above, cuBLASLt's tiles
 * (docs/PERFORMANCE.md). */
#ifndef DSK_GEMV_MAX_M
#define DSK_GEMV_MAX_M 16
#endif

/* Dense: out_j[m][n] = x[m] . W_j[n] for j < njobs (1 or 2), m < M <= DSK_GEMV_MAX_M. */
typedef struct dsk_gemv_job {
	const void *w;     /* [N][K] */
	const float *ws;   /* FP8 scales [ceil(N/128)][sld] */
	int sld, N;
	void *out;         /* float [M][ldo], or bf16 h for glu */
	int ldo;
} dsk_gemv_job;

/* x: bf16 [M][K], or e4m3 [Mp][K] with scales xs[K/128][Mp]. glu: two
 * jobs of one shape (gate, up), out of job 0 gets bf16 h. */
DSK_EXTERN_C int dsk_gemv(const dsk_gemv_job *jobs, int njobs, int glu, const void *x, const float *xs, int M, int Mp,
			  int K, int fp8, dsk_stream s, ds_err *e);

/* Routed experts: for each expert x listed in act (act[0] of them, ids
 * from act[1]) with cnt[x] rows from off[x], out[r] = x_row(src(r)) . W_x,
 * src(r) = row_src[r] (or r when row_src is NULL); weights wp[j][x] all
 * [N][K] (FP8: scales sp[j][x], row stride sld); FP8 activations with
 * scales xs[K/128][xs_ld]. glu: wp[0] gate, wp[1] up, out bf16 h rows.
 * max_active bounds act[0] (the grid); max_rows bounds any expert's rows
 * and picks the rows a pass takes. */
typedef struct dsk_moe_gemv_args {
	void *out;
	int ldo;
	const void *x;
	const float *xs;
	int xs_ld;
	const int32_t *row_src, *off, *cnt, *act;
	int max_active, max_rows;
	const void *const *wp[2];
	const float *const *sp[2];
	int sld, fp8, glu, N, K;
	int no_bulk; /* 1: never dsk_moe_gemv_bulk (tests compare the two) */
} dsk_moe_gemv_args;

DSK_EXTERN_C int dsk_moe_gemv(const dsk_moe_gemv_args *a, dsk_stream s, ds_err *e);

/* The same for bf16 weights and max_rows <= 2 with the weight rows streamed
 * into shared memory by bulk asynchronous copies (kernels/moe_bulk.cu), the
 * same bits; dsk_moe_gemv takes it where it applies. -ENOTSUP (e untouched)
 * elsewhere, or with DS_CUDA_MOE_BULK=0 in the environment. */
DSK_EXTERN_C int dsk_moe_gemv_bulk(const dsk_moe_gemv_args *a, dsk_stream s, ds_err *e);
/* Whether dsk_moe_gemv takes dsk_moe_gemv_bulk for these arguments. */
DSK_EXTERN_C int dsk_moe_bulk_pick(const dsk_moe_gemv_args *a);

/* Per-head rows (MLA's value up-projection for 1-2 tokens): out[t][h][i] =
 * bf16(W_h[i] . x[t][h]) for t < T <= 2, h < nh, i < rows, W_h = W + h *
 * wstride ([rows][K] bf16), x[t][h] = x + (t * nh + h) * K (bf16). The
 * weights load before the wait for the previous kernel (kernels/launch.cuh).
 * -ENOTSUP (e untouched) above 2 tokens or K > 2048: the caller's GEMM. */
DSK_EXTERN_C int dsk_gemv_heads(dsk_bf16 *out, const dsk_bf16 *W, long wstride, const dsk_bf16 *x, int T, int nh,
				int rows, int K, dsk_stream s, ds_err *e);

#endif
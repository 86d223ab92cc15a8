/* moe_gemm.h — the routed experts of a step as two grouped GEMM launches
 * (bf16, or FP8 e4m3): the rows of x sorted by expert (expert e's rows
 * off[e] .. off[e+1] - 1, as the routing plan lays them out), each range
 * times its expert's weight [N][K] (x's rows read directly, or by index
 * through row_src: the device plan's token rows). GLU: out (bf16) = SiLU(x Wg^T) * (x Wu^T)
 * in one launch; otherwise out (float32) = x W^T. Blocks find their expert
 * and rows from off on the device, so one launch covers every expert
 * (cuBLASLt a GEMM an expert ran the V2-Lite 4096-token prefill's experts
 * at ~190 TFLOP/s, this at ~215). Rows outside every range are not
 * written. Shapes: E <= 256, N % 16 == 0, K % 32 == 0 (FP8: K % 128 == 0,
 * e4m3 products with DeepSeek's block scaling, activations quantized per
 * 1x128 group by the caller). */
#ifndef DSK_MOE_GEMM_H
#define DSK_MOE_GEMM_H

#include "kernels/dsk.h"

typedef struct dsk_moe_gemm_args {
	const void *x;                /* [rows][K] bf16, or e4m3 (fp8) */
	const int32_t *row_src;       /* NULL, or device [rows]: plan row r reads x row row_src[r] (-1: zeros) */
	const int32_t *off;           /* device [E + 1] */
	const void *const *w0, *const *w1; /* device [E] pointers to [N][K] bf16 or e4m3 (w1: up, GLU only) */
	void *out;                    /* GLU: bf16 [rows][ldo]; else float [rows][ldo] */
	int E, N, K, ldo;
	int max_rows;                 /* >= off[E]: sizes the grid */
	/* fp8: x per 1x128 group as dsk_quant_fp8 lays it out (scales
	 * xs[K/128][xs_ld], xs_ld a multiple of 4 above every x row used);
	 * without row_src, every off[e] a multiple of 4 (the routing plan pads
	 * experts to 16 rows);
	 * the weights' 128x128 block scales s0/s1[e][N/128][sld] */
	int fp8;
	const float *xs;
	int xs_ld;
	const float *const *s0, *const *s1;
	int sld;
} dsk_moe_gemm_args;

DSK_EXTERN_C int dsk_moe_gemm_ok(int E, int N, int K);
DSK_EXTERN_C int dsk_moe_gemm(const dsk_moe_gemm_args *a, int glu, dsk_stream s, ds_err *e);

#endif

/* gemm.h — out[M][N] (float32) = x[M][K] (bf16) @ W^T for a weight W[N][K]
 * stored bf16, or FP8 e4m3 with DeepSeek's 128x128 block scales. FP8 goes
 * through cuBLASLt's block-scaled mode (weights BLK128x128, activations
 * quantized here per token in 1x128 groups, VEC128); bf16 through cuBLASLt.
 * A dsk_gemm owns the handles and scratch; one thread drives it. */
#ifndef DSK_GEMM_H
#define DSK_GEMM_H

#include <stddef.h>

#include "kernels/dsk.h"

enum { DSK_W_BF16 = 1, DSK_W_FP8 = 2 };

typedef struct dsk_weight {
	int type;        /* DSK_W_* */
	int rows, cols;  /* N (out), K (in) */
	const void *w;   /* device: [rows][cols] */
	/* FP8: device float [ceil(rows/128)][sld], sld = ceil(cols/128) rounded
	 * up to 4 (cuBLASLt wants 16-byte aligned scale rows). */
	const float *scale;
	int sld;
} dsk_weight;

typedef struct dsk_gemm dsk_gemm;

/* Rows of x and out are padded by the caller to dsk_gemm_pad(M). */
static inline int dsk_gemm_pad(int m) { return (m + 15) & ~15; }

/* FP8 weights cuBLASLt's block-scaled mode takes (else dequantize). */
static inline int dsk_gemm_fp8_ok(int rows, int cols) { return cols % 128 == 0 && rows % 16 == 0; }

DSK_EXTERN_C int dsk_gemm_create(dsk_stream s, dsk_gemm **out, ds_err *e);
DSK_EXTERN_C dsk_gemm *dsk_gemm_free(dsk_gemm *g);
/* x: device bf16 [dsk_gemm_pad(M)][K]; out: device float [pad(M)][ldo >= N]. */
DSK_EXTERN_C int dsk_gemm_run(dsk_gemm *g, float *out, int ldo, const dsk_bf16 *x, int M, const dsk_weight *W,
			      ds_err *e);
/* The same with a bf16 result. */
DSK_EXTERN_C int dsk_gemm_run_bf16(dsk_gemm *g, dsk_bf16 *out, int ldo, const dsk_bf16 *x, int M,
				   const dsk_weight *W, ds_err *e);
/* Two weights of the same type and K applied to the same rows: one GEMV
 * launch (one quantization) where the GEMV path takes both, else two GEMMs. */
DSK_EXTERN_C int dsk_gemm_run2(dsk_gemm *g, float *out0, int ldo0, const dsk_weight *W0, float *out1, int ldo1,
			       const dsk_weight *W1, const dsk_bf16 *x, int M, ds_err *e);
/* h[M][ldh] = bf16(silu(x Wg^T) * (x Wu^T)) in one GEMV launch; -ENOTSUP
 * (e untouched) where the GEMV path does not take the shapes: the caller
 * runs two GEMMs and dsk_silu_mul, which compute the same function. */
DSK_EXTERN_C int dsk_gemm_glu(dsk_gemm *g, dsk_bf16 *h, int ldh, const dsk_bf16 *x, int M, const dsk_weight *Wg,
			      const dsk_weight *Wu, ds_err *e);
/* Quantizes x [M][K] bf16 into q [M][K] e4m3 and scales sc[K/128][M]
 * (token-contiguous, as VEC128 wants): sc = amax/448 per 1x128 group. */
DSK_EXTERN_C int dsk_quant_fp8(uint8_t *q, float *sc, const dsk_bf16 *x, int M, int K, dsk_stream s, ds_err *e);
/* The same for *rows rows (device memory; scales still [K/128][max_rows]). */
DSK_EXTERN_C int dsk_quant_fp8_dev(uint8_t *q, float *sc, const dsk_bf16 *x, const int32_t *rows, int max_rows,
				   int K, dsk_stream s, ds_err *e);
/* x's FP8 copy, q [M][K] e4m3 with scales sc[K/128][dsk_gemm_pad(M)], was
 * written with x by the kernel that made x (dsk_add_rmsnorm's dsk_qout): the
 * GEMV-sized FP8 calls on exactly this x and M read it instead of quantizing
 * x again (the same bits, one launch fewer), until dsk_gemm_prequant(g, NULL,
 * 0, NULL, NULL) forgets it. The caller forgets it before x is rewritten. */
DSK_EXTERN_C void dsk_gemm_prequant(dsk_gemm *g, const dsk_bf16 *x, int M, const uint8_t *q, const float *sc);
/* Dequantizes an FP8 weight into bf16 [rows][cols] (the fallback path). */
DSK_EXTERN_C int dsk_dequant_fp8(dsk_bf16 *out, const dsk_weight *W, dsk_stream s, ds_err *e);
/* Rows up to 2 go through the weight-streaming GEMV (kernels/gemv.h) unless off. */
DSK_EXTERN_C void dsk_gemm_set_gemv(dsk_gemm *g, int on);
/* Bumped whenever scratch buffers the GEMMs launch with are reallocated
 * (graphs that captured them are stale then). */
DSK_EXTERN_C unsigned dsk_gemm_generation(const dsk_gemm *g);

#endif

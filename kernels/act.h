/* act.h — the MLP's activation: h = bf16(silu(g) * u) over float32 gate and
 * up projections [rows][n] (row strides ldg for g and u), h [rows][n]. */
#ifndef DSK_ACT_H
#define DSK_ACT_H

#include "kernels/dsk.h"

DSK_EXTERN_C int dsk_silu_mul(dsk_bf16 *h, const float *g, const float *u, int rows, int n, dsk_stream s, ds_err *e);

#endif

/* sample.h — token choice on the GPU, so that only ids cross back to the
 * host. Argmax per logit row, with the host sampler's tie rule (the first
 * maximal index). */
#ifndef DSK_SAMPLE_H
#define DSK_SAMPLE_H

#include "kernels/dsk.h"

/* ids[r] = argmax over logits[r][0..V) for r < rows (row stride ld). */
DSK_EXTERN_C int dsk_argmax_rows(int32_t *ids, const float *logits, int rows, int V, int ld, dsk_stream s, ds_err *e);

#endif

/* sample.h — token choice on the GPU, so that only ids cross back to the
 * host. Argmax per logit row with the host sampler's tie rule (the first
 * maximal index), or a draw from the row's filtered distribution:
 * softmax(l / T), top-k, top-p (the most probable tokens whose mass reaches
 * top_p), min-p (relative to the most probable), renormalized, then the
 * first token whose cumulative mass in id order exceeds u. The same
 * distribution as model/sampler.c (penalties excepted), with one
 * difference: tokens tied with the last one top-k or top-p keeps are all
 * kept (the host keeps the lower ids). Masses are summed in fixed point,
 * so a draw does not depend on thread timing. */
#ifndef DSK_SAMPLE_H
#define DSK_SAMPLE_H

#include "kernels/dsk.h"

typedef struct dsk_draw {
	float temperature; /* 0: the argmax */
	float top_p;       /* 1: off */
	float min_p;       /* 0: off */
	float u;           /* uniform in [0, 1), from the request's RNG */
	int top_k;         /* 0: off */
	int pad_;
} dsk_draw;

/* ids[r] for the rows r < rows of logits (row stride ld): the argmax where
 * draws[r] (device array) has temperature 0, else drawn with it; rows with
 * temperature > 0 are overwritten with their unnormalized probabilities. */
DSK_EXTERN_C int dsk_draw_rows(int32_t *ids, float *logits, int rows, int V, int ld, const dsk_draw *draws,
			       dsk_stream s, ds_err *e);

#endif

/* chain.h — the device-side bookkeeping of chained drafting at depth > 1
 * (ds_batch.chain_depth): after a verify step, which row of each chained
 * sequence the next MTP pass continues from, and that pass's inputs, so the
 * passes follow each other without the host.
 * A chained sequence s owns the step's rows with seq[t] == s, consecutive,
 * in rows [0, Tc); its row i fed token i (tok[t]) at position pos[t]. Its
 * accepted count j is the number of leading rows i < n-1 whose main argmax
 * equals the token of row i+1 (the greedy check of its drafts). */
#ifndef DSK_CHAIN_H
#define DSK_CHAIN_H

#include "kernels/dsk.h"

/* Before the first MTP pass (amax: the main step's argmax rows):
 * crow[s] = the row of s's accepted position, cpos[s] = that position + 1. */
DSK_EXTERN_C int dsk_chain_accept(int32_t *crow, int32_t *cpos, const int32_t *amax, const int32_t *tok,
				  const int32_t *pos, const int32_t *seq, int Tc, int nc, dsk_stream s, ds_err *e);
/* Inputs of MTP pass k >= 2 from pass k-1's argmax rows amax and output
 * rows x ([rows][H]): row r = crow[s] for k == 2 (pass 1 ran over all the
 * step's rows), s after (one row a sequence). tok[s] = amax[r], hin row s =
 * x row r, pos[s] = cpos[s] + k - 2, seq[s] = s, for s < nc.
 * The pass's kernels that read positions and sequences before their PDL
 * wait (attention, the latent prep: kernels/launch.cuh allows that for host
 * uploads) run several launches after this one; with at most two kernels
 * in flight it has finished, and its writes are visible, before they start. */
DSK_EXTERN_C int dsk_chain_next(int32_t *tok, float *hin, int32_t *pos, int32_t *seq, const int32_t *amax,
				const float *x, const int32_t *crow, const int32_t *cpos, int k, int nc, int H,
				dsk_stream s, ds_err *e);

#endif

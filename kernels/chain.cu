#include "kernels/chain.h"

#include "kernels/launch.cuh"

/* One thread a sequence: the rows are few (a verify step's drafts). */
static __global__ void accept_k(int32_t *crow, int32_t *cpos, const int32_t *amax, const int32_t *tok,
				const int32_t *pos, const int32_t *seq, int Tc, int nc)
{
	dsk_pdl_enter();
	const int s = blockIdx.x * blockDim.x + threadIdx.x;
	if (s >= nc)
		return;
	int t0 = 0;
	while (t0 < Tc && seq[t0] != s)
		t0++;
	int n = 0;
	while (t0 + n < Tc && seq[t0 + n] == s)
		n++;
	int j = 0;
	while (j + 1 < n && amax[t0 + j] == tok[t0 + j + 1])
		j++;
	crow[s] = t0 + j;
	cpos[s] = pos[t0 + j] + 1;
}

static __global__ void next_k(int32_t *tok, float *hin, int32_t *pos, int32_t *seq, const int32_t *amax,
			      const float *x, const int32_t *crow, const int32_t *cpos, int k, int H)
{
	dsk_pdl_enter();
	const int s = blockIdx.x;
	const int r = crow ? crow[s] : s;
	for (int i = threadIdx.x; i < H; i += blockDim.x)
		hin[(size_t)s * H + i] = x[(size_t)r * H + i];
	if (threadIdx.x == 0) {
		tok[s] = amax[r];
		pos[s] = cpos[s] + k - 2;
		seq[s] = s;
	}
}

extern "C" int dsk_chain_accept(int32_t *crow, int32_t *cpos, const int32_t *amax, const int32_t *tok,
				const int32_t *pos, const int32_t *seq, int Tc, int nc, dsk_stream s, ds_err *e)
{
	if (nc <= 0 || Tc < nc)
		return nc == 0 ? 0 : -EINVAL;
	dsk_launch(accept_k, (nc + 127) / 128, 128, 0, s, crow, cpos, amax, tok, pos, seq, Tc, nc);
	return dsk_check(e, "chain accept");
}

extern "C" int dsk_chain_next(int32_t *tok, float *hin, int32_t *pos, int32_t *seq, const int32_t *amax,
			      const float *x, const int32_t *crow, const int32_t *cpos, int k, int nc, int H,
			      dsk_stream s, ds_err *e)
{
	if (nc <= 0 || k < 2 || H <= 0)
		return nc == 0 ? 0 : -EINVAL;
	dsk_launch(next_k, nc, 128, 0, s, tok, hin, pos, seq, amax, x, k == 2 ? crow : (const int32_t *)NULL, cpos,
		   k, H);
	return dsk_check(e, "chain next");
}

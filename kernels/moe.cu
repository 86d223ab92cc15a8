/* moe.cu — routing, permutation, gather and combine (see moe.h). */
#include <cuda_runtime.h>

#include "kernels/moe.h"
#include "kernels/launch.cuh"

#define MAX_E 1024

/* Index of the largest v[i] over i < n not taken; ties go to the lower index. */
static __device__ int warp_argmax(const float *v, const unsigned char *taken, int n)
{
	const int lane = threadIdx.x & 31;
	float best = 0;
	int bi = -1;
	for (int i = lane; i < n; i += 32)
		if (!taken[i] && (bi < 0 || v[i] > best)) {
			best = v[i];
			bi = i;
		}
	for (int o = 16; o; o >>= 1) {
		float ob = __shfl_xor_sync(0xffffffffu, best, o);
		int oi = __shfl_xor_sync(0xffffffffu, bi, o);
		if (oi >= 0 && (bi < 0 || ob > best || (ob == best && oi < bi))) {
			best = ob;
			bi = oi;
		}
	}
	return bi;
}

/* Shared memory a routing warp uses: scores, choice values, 64 group
 * scores, its MAX_K choices, then (after all warps' floats) taken flags for
 * experts and groups. */
#define MAX_K 32
#define RW_FLOATS(E) (2 * (E) + 64 + MAX_K)
static size_t route_smem(int E, int warps) { return (size_t)warps * (sizeof(float) * RW_FLOATS(E) + (E + 64)); }

/* Token t's routing by warp wib of the block, in three steps over its
 * scratch in sm: the scores s and the choice values ch (groups left out
 * masked); the top-K of ch into sel (largest first, ties to the lower
 * index); the ids and weights. */
static __device__ void route_scores(const dsk_route_cfg &c, const float *logits, const float *bias, int t, float *sm,
				    int wib)
{
	const int lane = threadIdx.x & 31;
	const int E = c.E;
	float *s = sm + (size_t)wib * RW_FLOATS(E);
	float *ch = s + E;
	float *gs = ch + E; /* 64 group scores */
	unsigned char *gtaken = (unsigned char *)(sm + (size_t)(blockDim.x / 32) * RW_FLOATS(E)) + (size_t)wib * (E + 64) + E;
	const float *lg = logits + (size_t)t * E;
	if (c.sigmoid) {
		for (int i = lane; i < E; i += 32)
			s[i] = 1.0f / (1.0f + expf(-lg[i]));
	} else {
		float m = -INFINITY;
		for (int i = lane; i < E; i += 32)
			m = fmaxf(m, lg[i]);
		for (int o = 16; o; o >>= 1)
			m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
		float sum = 0;
		for (int i = lane; i < E; i += 32) {
			s[i] = expf(lg[i] - m);
			sum += s[i];
		}
		for (int o = 16; o; o >>= 1)
			sum += __shfl_xor_sync(0xffffffffu, sum, o);
		const float inv = 1.0f / sum;
		for (int i = lane; i < E; i += 32)
			s[i] *= inv;
	}
	for (int i = lane; i < E; i += 32)
		ch[i] = s[i] + (bias && c.method == 2 ? bias[i] : 0.0f);
	__syncwarp();
	const int G = c.n_group;
	if (c.method != 0 && G > 1) {
		const int per = E / G;
		for (int g = lane; g < G; g += 32) {
			const float *v = ch + g * per;
			if (c.method == 2) {
				int a = 0;
				for (int i = 1; i < per; i++)
					if (v[i] > v[a])
						a = i;
				int b = -1;
				for (int i = 0; i < per; i++)
					if (i != a && (b < 0 || v[i] > v[b]))
						b = i;
				gs[g] = v[a] + (b >= 0 ? v[b] : 0.0f);
			} else {
				float m = v[0];
				for (int i = 1; i < per; i++)
					m = fmaxf(m, v[i]);
				gs[g] = m;
			}
			gtaken[g] = 0;
		}
		__syncwarp();
		for (int j = 0; j < c.topk_group; j++) {
			int g = warp_argmax(gs, gtaken, G);
			if (lane == 0)
				gtaken[g] = 1;
			__syncwarp();
		}
		/* Groups left out are masked with 0.0, as the references do. */
		for (int i = lane; i < E; i += 32)
			if (!gtaken[i / per])
				ch[i] = 0.0f;
		__syncwarp();
	}
}

static __device__ void route_pick(const dsk_route_cfg &c, float *sm, int wib)
{
	const int lane = threadIdx.x & 31, E = c.E;
	float *ch = sm + (size_t)wib * RW_FLOATS(E) + E;
	int *sel = (int *)(ch + E + 64);
	unsigned char *taken = (unsigned char *)(sm + (size_t)(blockDim.x / 32) * RW_FLOATS(E)) + (size_t)wib * (E + 64);
	for (int i = lane; i < E; i += 32)
		taken[i] = 0;
	__syncwarp();
	for (int j = 0; j < c.K; j++) {
		int b = warp_argmax(ch, taken, E);
		if (lane == 0) {
			taken[b] = 1;
			sel[j] = b;
		}
		__syncwarp();
	}
}

/* route_pick for all T tokens by the block's threads at once, thread
 * t E + i ranking expert i of token t (T E <= blockDim.x): the same order,
 * without K rounds of warp reductions on one warp (NaN ranks last). */
static __device__ void route_rank(const dsk_route_cfg &c, float *sm, int T)
{
	const int E = c.E, t = threadIdx.x / E, i = threadIdx.x % E;
	if (t >= T)
		return;
	const float *ch = sm + (size_t)t * RW_FLOATS(E) + E;
	int *sel = (int *)(ch + E + 64);
	const float v = isnan(ch[i]) ? -INFINITY : ch[i];
	int r = 0;
	for (int j = 0; j < E; j++) {
		const float u = isnan(ch[j]) ? -INFINITY : ch[j];
		r += u > v || (u == v && j < i);
	}
	if (r < c.K)
		sel[r] = i;
}

/* The ids (also in sids[0..K) when sids, shared memory of the caller) and
 * weights from sel: the weights are computed from the choices kept in
 * shared memory (read back from ids, each was a round trip behind the store
 * before it, six of them at V2-Lite's top-6). */
static __device__ void route_finish(const dsk_route_cfg &c, int t, int32_t *ids, float *w, float *sm, int wib,
				    int *sids)
{
	const int lane = threadIdx.x & 31, E = c.E;
	const float *s = sm + (size_t)wib * RW_FLOATS(E);
	const int *sel = (const int *)(s + 2 * E + 64);
	float sum = 0;
	for (int j = 0; j < c.K; j++)
		sum += s[sel[j]];
	int32_t *id = ids + (size_t)t * c.K;
	float *wt = w + (size_t)t * c.K;
	const float inv = c.norm_topk ? (float)(1.0 / ((double)sum + 1e-20)) : 1.0f;
	for (int j = lane; j < c.K; j += 32) {
		const int b = sel[j];
		id[j] = b;
		if (sids)
			sids[j] = b;
		wt[j] = (c.norm_topk ? s[b] * inv : s[b]) * c.scale;
	}
}

static __device__ void route_token(const dsk_route_cfg &c, const float *logits, const float *bias, int t, int32_t *ids,
				   float *w, float *sm, int wib)
{
	route_scores(c, logits, bias, t, sm, wib);
	route_pick(c, sm, wib);
	__syncwarp();
	route_finish(c, t, ids, w, sm, wib, NULL);
}

/* One warp per token. */
static __global__ void route_k(dsk_route_cfg c, const float *logits, const float *bias, int T, int32_t *ids, float *w)
{
	extern __shared__ float sm[];
	dsk_pdl_enter();
	const int wib = threadIdx.x / 32, t = blockIdx.x * (blockDim.x / 32) + wib;
	if (t < T)
		route_token(c, logits, bias, t, ids, w, sm, wib);
}

extern "C" int dsk_moe_route(const dsk_route_cfg *c, const float *logits, const float *bias, int T, int32_t *ids,
			     float *w, dsk_stream s, ds_err *e)
{
	if (c->E > MAX_E || c->n_group > 64 || c->K > c->E || c->K > MAX_K || (c->n_group > 1 && c->E % c->n_group))
		return ds_errf(e, -EINVAL, "moe_route: %d experts in %d groups, top-%d unsupported", c->E, c->n_group, c->K);
	if (T <= 0)
		return 0;
	const int wpb = 4;
	const size_t smem = route_smem(c->E, wpb);
	dsk_launch(route_k, (T + wpb - 1) / wpb, 32 * wpb, smem, s, *c, logits, bias, T, ids, w);
	return dsk_check(e, "moe_route");
}

/* One block of 1024 threads (one per expert, E <= MAX_E): count, scans of
 * the padded counts and of the active flags, then each pair takes the next
 * row of its expert (rows within an expert in any order: each is computed
 * alone). */
static __device__ void warp_scan2(int *a, int *b, int lane)
{
	for (int o = 1; o < 32; o <<= 1) {
		const int u = __shfl_up_sync(0xffffffffu, *a, o), v = __shfl_up_sync(0xffffffffu, *b, o);
		if (lane >= o) {
			*a += u;
			*b += v;
		}
	}
}

typedef struct {
	int c[MAX_E], cur[MAX_E + 1], wrow[32], wact[32];
} plan_smem;

static __device__ void plan_body(const int32_t *ids, int n, int E, int32_t *cnt, int32_t *off, int32_t *pos,
				 int32_t *row_tok, int K, int32_t *act, unsigned long long *load, plan_smem &p)
{
	int *c = p.c, *cur = p.cur, *wrow = p.wrow, *wact = p.wact;
	const int x = threadIdx.x, lane = x & 31, wid = x >> 5;
	if (x < E)
		c[x] = 0;
	__syncthreads();
	for (int i = x; i < n; i += blockDim.x)
		atomicAdd(&c[ids[i]], 1);
	__syncthreads();
	const int pc = x < E ? (c[x] + 15) & ~15 : 0, a = x < E && c[x] > 0;
	int ip = pc, ia = a; /* inclusive within the warp */
	warp_scan2(&ip, &ia, lane);
	if (lane == 31) {
		wrow[wid] = ip;
		wact[wid] = ia;
	}
	__syncthreads();
	if (wid == 0) {
		const int r = wrow[lane], q = wact[lane];
		int ir = r, iq = q;
		warp_scan2(&ir, &iq, lane);
		wrow[lane] = ir - r; /* exclusive: the warps before */
		wact[lane] = iq - q;
		if (lane == 31) {
			cur[E] = ir;
			off[E] = ir;
			if (act)
				act[0] = iq;
		}
	}
	__syncthreads();
	if (x < E) {
		const int o = wrow[wid] + ip - pc;
		cur[x] = o;
		off[x] = o;
		cnt[x] = c[x];
		if (a && act)
			act[1 + wact[wid] + ia - 1] = x;
	}
	__syncthreads();
	for (int r = threadIdx.x; r < cur[E]; r += blockDim.x)
		row_tok[r] = -1;
	__syncthreads();
	for (int i = threadIdx.x; i < n; i += blockDim.x) {
		int r = atomicAdd(&cur[ids[i]], 1);
		pos[i] = r;
		row_tok[r] = i / K;
	}
	/* Last: the read-modify-write waits for its load, which before a
	 * barrier held the whole block. */
	if (load && x < E)
		load[x] += (unsigned long long)c[x];
}

static __global__ void __launch_bounds__(1024) plan_k(const int32_t *ids, int n, int E, int32_t *cnt, int32_t *off,
						      int32_t *pos, int32_t *row_tok, int K, int32_t *act,
						      unsigned long long *load)
{
	__shared__ plan_smem p;
	dsk_pdl_enter();
	plan_body(ids, n, E, cnt, off, pos, row_tok, K, act, load, p);
}

/* Decode-sized steps: routing (a warp per token) and the plan in one block,
 * one launch instead of two; the plan reads the choices from shared memory
 * (not back from ids). */
static __global__ void __launch_bounds__(1024) route_plan_k(dsk_route_cfg rc, const float *logits, const float *bias,
							    int T, int32_t *ids, float *w, int32_t *cnt, int32_t *off,
							    int32_t *pos, int32_t *row_tok, int32_t *act,
							    unsigned long long *load)
{
	extern __shared__ float sm[];
	__shared__ plan_smem p;
	__shared__ int sids[32 * MAX_K];
	dsk_pdl_enter();
	const int wib = threadIdx.x / 32;
	if (wib < T)
		route_scores(rc, logits, bias, wib, sm, wib);
	__syncthreads();
	if (T * rc.E <= (int)blockDim.x)
		route_rank(rc, sm, T);
	else if (wib < T)
		route_pick(rc, sm, wib);
	__syncthreads();
	if (wib < T)
		route_finish(rc, wib, ids, w, sm, wib, sids + wib * rc.K);
	__syncthreads();
	plan_body(sids, T * rc.K, rc.E, cnt, off, pos, row_tok, rc.K, act, load, p);
}

extern "C" int dsk_moe_plan(const int32_t *ids, int T, int K, int E, int32_t *cnt, int32_t *off, int32_t *pos,
			    int32_t *row_tok, int32_t *act, unsigned long long *load, int max_rows, dsk_stream s,
			    ds_err *e)
{
	if (E > MAX_E || max_rows < T * K + 15 * E)
		return ds_errf(e, -EINVAL, "moe_plan: %d rows cannot hold %d pairs over %d experts", max_rows, T * K, E);
	dsk_launch(plan_k, 1, 1024, 0, s, ids, T * K, E, cnt, off, pos, row_tok, K, act, load);
	return dsk_check(e, "moe_plan");
}

static __global__ void moe_gather_k(dsk_bf16 *xp, const dsk_bf16 *x, const int32_t *row_tok, int dim)
{
	dsk_pdl_enter();
	const int r = blockIdx.x, t = row_tok[r];
	for (int c = threadIdx.x; c < dim; c += blockDim.x)
		xp[(size_t)r * dim + c] = t >= 0 ? x[(size_t)t * dim + c] : __float2bfloat16(0.0f);
}

extern "C" int dsk_moe_gather(dsk_bf16 *xp, const dsk_bf16 *x, const int32_t *row_tok, int P, int dim, dsk_stream s,
			      ds_err *e)
{
	if (P <= 0)
		return 0;
	dsk_launch(moe_gather_k, P, 256, 0, s, xp, x, row_tok, dim);
	return dsk_check(e, "moe_gather");
}

static __global__ void combine_k(float *out, const float *shared, const float *yp, const int32_t *pos, const float *w,
				 int K, int dim)
{
	dsk_pdl_enter();
	const int t = blockIdx.x;
	for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < dim; c += gridDim.y * blockDim.x) {
		float acc = shared ? shared[(size_t)t * dim + c] : 0.0f;
		for (int k = 0; k < K; k++)
			acc += w[(size_t)t * K + k] * yp[(size_t)pos[(size_t)t * K + k] * dim + c];
		out[(size_t)t * dim + c] = acc;
	}
}

extern "C" int dsk_moe_combine(float *out, const float *shared, const float *yp, const int32_t *pos, const float *w,
			       int T, int K, int dim, dsk_stream s, ds_err *e)
{
	if (T <= 0)
		return 0;
	dsk_launch(combine_k, dim3(T, (dim + 255) / 256), 256, 0, s, out, shared, yp, pos, w, K, dim);
	return dsk_check(e, "moe_combine");
}

extern "C" int dsk_moe_route_plan(const dsk_route_cfg *c, const float *logits, const float *bias, int T, int32_t *ids,
				  float *w, int32_t *cnt, int32_t *off, int32_t *pos, int32_t *row_tok, int32_t *act,
				  unsigned long long *load, int max_rows, dsk_stream s, ds_err *e)
{
	const size_t smem = route_smem(c->E, 32);
	if (T > 32 || smem > 160 * 1024) {
		int rc = dsk_moe_route(c, logits, bias, T, ids, w, s, e);
		return rc ? rc : dsk_moe_plan(ids, T, c->K, c->E, cnt, off, pos, row_tok, act, load, max_rows, s, e);
	}
	if (c->E > MAX_E || c->n_group > 64 || c->K > c->E || c->K > MAX_K || (c->n_group > 1 && c->E % c->n_group))
		return ds_errf(e, -EINVAL, "moe_route: %d experts in %d groups, top-%d unsupported", c->E, c->n_group, c->K);
	if (max_rows < T * c->K + 15 * c->E)
		return ds_errf(e, -EINVAL, "moe_plan: %d rows cannot hold %d pairs over %d experts", max_rows, T * c->K,
			       c->E);
	if (T <= 0)
		return 0;
	static size_t raised;
	if (smem > 48 * 1024 && smem > raised) {
		cudaFuncSetAttribute(route_plan_k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
		raised = smem;
	}
	dsk_launch(route_plan_k, 1, 1024, smem, s, *c, logits, bias, T, ids, w, cnt, off, pos, row_tok, act, load);
	return dsk_check(e, "moe_route_plan");
}

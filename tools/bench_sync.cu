/* bench_sync.cu — what one dependency between two steps of work costs at
 * batch 1 on this GPU: a kernel boundary (CUDA graph, with and without
 * programmatic dependent launch) against a grid-wide barrier inside one
 * persistent kernel. Each step streams `kb` KiB of a weight-like buffer
 * (distinct bytes every step, beyond L2 in total) split over the blocks and
 * reads one value the step before wrote, so steps are truly dependent.
 *   nvcc -O3 -arch=sm_90a -I. -o bench_sync tools/bench_sync.cu && ./bench_sync
 * Kernels launch as dsd's do (kernels/launch.cuh).
 * Prints us a step for each way, median of 7 timed runs of 256 steps:
 * kernels in a graph, with PDL (wait first), with PDL and the weights
 * streamed before the wait, and one persistent kernel with a barrier. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <algorithm>
#include <vector>

#include "kernels/launch.cuh"

#define STEPS 256
#define THREADS 256

int dsk_pdl_on = 1; /* kernels/dsk.cu's switch, which this tool does not link */

/* One step's work for block b of nb: sum its slice of w (bytes of step s),
 * plus the value step s-1 left in link; block 0 writes the next link. */
static __device__ float step_work(const float4 *w, size_t n4, int b, int nb, float in)
{
	float acc = 0;
	for (size_t i = (size_t)b * THREADS + threadIdx.x; i < n4; i += (size_t)nb * THREADS) {
		float4 v = __ldcs(w + i);
		acc += v.x + v.y + v.z + v.w;
	}
	__shared__ float red[THREADS / 32];
	for (int o = 16; o; o >>= 1)
		acc += __shfl_xor_sync(0xffffffffu, acc, o);
	if ((threadIdx.x & 31) == 0)
		red[threadIdx.x / 32] = acc;
	__syncthreads();
	float t = 0;
	if (threadIdx.x == 0)
		for (int i = 0; i < THREADS / 32; i++)
			t += red[i];
	return t * 1e-30f + in;
}

/* pdl 0: plain; 1: wait first; 2: the weight slice streamed before the
 * wait (what dsd's GEMVs do with rows that fit one pass), the link after */
static __global__ void k_step(const float4 *w, size_t n4, float *link, int s, int pdl)
{
	float t = 0;
	if (pdl == 2) {
		t = step_work(w, n4, blockIdx.x, gridDim.x, 0);
		dsk_pdl_enter();
		t += link[s];
	} else {
		if (pdl)
			dsk_pdl_enter();
		t = step_work(w, n4, blockIdx.x, gridDim.x, link[s]);
	}
	if (threadIdx.x == 0 && blockIdx.x == 0)
		link[s + 1] = t + 1;
}

/* Sense-reversing grid barrier over the resident blocks. */
static __device__ void grid_barrier(unsigned *count, volatile unsigned *gen, unsigned nb)
{
	__syncthreads();
	if (threadIdx.x == 0) {
		unsigned g = *gen;
		__threadfence();
		if (atomicAdd(count, 1) == nb - 1) {
			*count = 0;
			__threadfence();
			*gen = g + 1;
		} else {
			while (*gen == g)
				;
		}
		__threadfence();
	}
	__syncthreads();
}

static __global__ void k_persist(const float4 *w, size_t n4, float *link, unsigned *bar, int steps)
{
	for (int s = 0; s < steps; s++) {
		float in = ((volatile float *)link)[s];
		float t = step_work(w + (size_t)s * n4, n4, blockIdx.x, gridDim.x, in);
		if (threadIdx.x == 0 && blockIdx.x == 0)
			link[s + 1] = t + 1;
		grid_barrier(bar, bar + 32, gridDim.x);
	}
}

/* us a step of what run() queues on st: the median of 7 runs after 2. */
template <typename F>
static double time_steps(cudaStream_t st, cudaEvent_t e0, cudaEvent_t e1, F run)
{
	std::vector<double> t;
	for (int r = 0; r < 9; r++) {
		cudaEventRecord(e0, st);
		run();
		cudaEventRecord(e1, st);
		cudaEventSynchronize(e1);
		float ms;
		cudaEventElapsedTime(&ms, e0, e1);
		if (r >= 2)
			t.push_back(ms * 1e3 / STEPS);
	}
	std::sort(t.begin(), t.end());
	return t[t.size() / 2];
}

int main(void)
{
	int sms = 0;
	cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
	const int kbs[] = { 0, 64, 256, 1024, 4096 };
	float *link;
	unsigned *bar;
	cudaMalloc(&link, sizeof(float) * (STEPS + 1));
	cudaMalloc(&bar, 256);
	cudaMemset(link, 0, sizeof(float) * (STEPS + 1));
	cudaMemset(bar, 0, 256);
	cudaStream_t st;
	cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
	cudaEvent_t e0, e1;
	cudaEventCreate(&e0);
	cudaEventCreate(&e1);
	printf("# %d SMs, %d blocks x %d threads a step; us a step (median of 7 runs of %d steps)\n", sms, sms, THREADS,
	       STEPS);
	printf("%8s %10s %10s %12s %11s %11s\n", "KiB/step", "graph", "graph+PDL", "PDL+prologue", "persistent",
	       "GB/s(pers)");
	for (int kb : kbs) {
		size_t n4 = (size_t)kb * 1024 / 16;
		float4 *w;
		cudaMalloc(&w, (n4 ? n4 : 1) * 16 * STEPS);
		cudaMemset(w, 0, (n4 ? n4 : 1) * 16 * STEPS);
		double res[4];
		for (int way = 0; way < 3; way++) {
			cudaGraph_t g;
			cudaGraphExec_t ge;
			dsk_pdl_on = way > 0;
			cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
			for (int s = 0; s < STEPS; s++)
				dsk_launch(k_step, sms, THREADS, 0, st, (const float4 *)(w + (size_t)s * n4), n4, link, s, way);
			cudaStreamEndCapture(st, &g);
			cudaGraphInstantiate(&ge, g, 0);
			res[way] = time_steps(st, e0, e1, [&] { cudaGraphLaunch(ge, st); });
			cudaGraphExecDestroy(ge);
			cudaGraphDestroy(g);
		}
		res[3] = time_steps(st, e0, e1, [&] { k_persist<<<sms, THREADS, 0, st>>>(w, n4, link, bar, STEPS); });
		cudaError_t err = cudaGetLastError();
		if (err != cudaSuccess) {
			printf("cuda: %s\n", cudaGetErrorString(err));
			return 1;
		}
		printf("%8d %10.2f %10.2f %12.2f %11.2f %11.0f\n", kb, res[0], res[1], res[2], res[3],
		       kb ? kb * 1024.0 / (res[3] * 1e3) : 0.0);
		cudaFree(w);
	}
	return 0;
}

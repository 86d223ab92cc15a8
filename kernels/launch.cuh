/* launch.cuh — how kernels/ launches its kernels: programmatic dependent
 * launch (Hopper). A kernel launched with dsk_launch may start while the one
 * before it on the stream is still running: its blocks become resident and
 * can read what no kernel writes — the model's weights, and the step's
 * inputs the host uploads before the step's first kernel (token ids,
 * positions, sequences, block tables: a copy is not relaxed by PDL) — then
 * call dsk_pdl_enter(), which waits until the previous kernel has finished
 * and its writes are visible, and lets the next kernel start in turn. So
 * every kernel launched this way calls dsk_pdl_enter() before it reads
 * anything a kernel wrote or writes anything; at most two kernels are in
 * flight. At batch 1 a decode step is some 400 short kernels, and the
 * launch of each then overlaps the tail of the one before (V2-Lite batch 1:
 * 3.43 -> 3.32 ms, docs/PERFORMANCE.md). Work on another stream (the shared experts'
 * side stream) joins by events, which PDL does not relax.
 * dsk_set_pdl(0) launches plainly (the waits become no-ops). */
#ifndef DSK_LAUNCH_CUH
#define DSK_LAUNCH_CUH

#include <cuda_runtime.h>
#include <utility>

extern int dsk_pdl_on;

static __device__ __forceinline__ void dsk_pdl_enter(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("griddepcontrol.wait;\n" ::: "memory");
	asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

template <typename... P, typename... A>
static inline void dsk_launch(void (*k)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, A &&...args)
{
	cudaLaunchConfig_t c = {};
	cudaLaunchAttribute at[1];
	at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
	at[0].val.programmaticStreamSerializationAllowed = 1;
	c.gridDim = grid;
	c.blockDim = block;
	c.dynamicSmemBytes = smem;
	c.stream = s;
	c.attrs = at;
	c.numAttrs = dsk_pdl_on ? 1 : 0;
	cudaLaunchKernelEx(&c, k, std::forward<A>(args)...);
}

/* The device's SM count (132 if it cannot be read), for grids sized to one
 * wave. */
static inline int dsk_sm_count(void)
{
	static int n;
	if (!n) {
		int d = 0;
		if (cudaGetDevice(&d) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, d) != cudaSuccess)
			n = 132;
	}
	return n;
}

#endif

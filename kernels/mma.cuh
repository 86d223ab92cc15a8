/* mma.cuh — the two tensor-core products the kernels use, as mma.sync
 * m16n8 with float32 accumulators c += A B: bf16 (k16) and e4m3 (k32).
 * Fragments as the PTX ISA lays them out: lane (g, q) = (lane / 4, lane % 4)
 * holds A rows g and g + 8, B column g, C rows g, g + 8 x columns 2q, 2q + 1;
 * and the shared-memory loads that feed them. */
#ifndef DSK_MMA_CUH
#define DSK_MMA_CUH

#include <cuda_bf16.h>
#include <stdint.h>

static __device__ __forceinline__ void dsk_mma_bf16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
						    uint32_t b0, uint32_t b1)
{
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
		     "{%0,%1,%2,%3};\n"
		     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
		     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ void dsk_mma_e4m3(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
						    uint32_t b0, uint32_t b1)
{
	asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
		     "{%0,%1,%2,%3};\n"
		     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
		     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* Two floats as the bf16 pair of an mma fragment register (lo first). */
static __device__ __forceinline__ uint32_t dsk_pack_bf16(float lo, float hi)
{
	__nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
	return *(uint32_t *)&v;
}

/* 16 bytes global -> shared by cp.async, zero-filled when !valid (src must
 * still be a mapped address). */
static __device__ __forceinline__ void dsk_cp16(void *dst, const void *src, bool valid)
{
	const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}

/* 4 bytes global -> shared by cp.async (through L1), zero-filled when !valid. */
static __device__ __forceinline__ void dsk_cp4(void *dst, const void *src, bool valid)
{
	const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
	asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0));
}

/* Shared-memory 8x8 b16 matrices into mma fragments: lanes 8m..8m+7 name
 * the rows of matrix m; lane (g, q) receives row g, columns 2q, 2q + 1 (A
 * and B fragments of row-major operands), or with .trans column g, rows
 * 2q, 2q + 1 (B fragments of a row-major k x n operand). */
static __device__ __forceinline__ void dsk_ldsm_x4(uint32_t r[4], const void *p)
{
	const unsigned a = (unsigned)__cvta_generic_to_shared(p);
	asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
		     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
		     : "r"(a));
}
static __device__ __forceinline__ void dsk_ldsm_x4_t(uint32_t r[4], const void *p)
{
	const unsigned a = (unsigned)__cvta_generic_to_shared(p);
	asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
		     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
		     : "r"(a));
}
static __device__ __forceinline__ void dsk_ldsm_x2_t(uint32_t r[2], const void *p)
{
	const unsigned a = (unsigned)__cvta_generic_to_shared(p);
	asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
}

#endif

#include "model/wload_cuda.h"

#ifdef DS_HAVE_CUDA

#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_STREAMS 16
#define MAX_BUFS 1024

struct ds_wload_cuda {
	const ds_weights *w;
	uint8_t *arena;
	size_t arena_bytes, used;
	void **ptrs;       /* [ds_weights_count(w)] */
	size_t n;
	cudaStream_t streams[MAX_STREAMS];
	int n_streams;
	cudaEvent_t ev[MAX_BUFS];
	unsigned char ev_made[MAX_BUFS], ev_pending[MAX_BUFS];
	char err[160];
};

static int cuda_fail(ds_wload_cuda *c, cudaError_t ce, const char *what)
{
	snprintf(c->err, sizeof(c->err), "%s: %s", what, cudaGetErrorString(ce));
	return -EIO;
}

static size_t round_up(size_t v)
{
	return (v + DS_WLOAD_CUDA_ALIGN - 1) & ~(size_t)(DS_WLOAD_CUDA_ALIGN - 1);
}

size_t ds_wload_cuda_arena_bytes(const ds_weights *w, const ds_tensor_ref *const *refs, size_t n)
{
	size_t total = 0, count = refs ? n : ds_weights_count(w);
	for (size_t i = 0; i < count; i++)
		total += round_up((refs ? refs[i] : ds_weights_at(w, i))->nbytes);
	return total;
}

static int c_alloc(void *ctx, size_t bytes, int buf, void **out)
{
	ds_wload_cuda *c = ctx;
	if (buf >= MAX_BUFS)
		return -EINVAL;
	/* Ordinary pages pinned by CUDA: O_DIRECT and io_uring can pin them
	 * too, which driver-mapped cudaHostAlloc memory does not allow. */
	void *p;
	if (posix_memalign(&p, 4096, bytes))
		return -ENOMEM;
	cudaError_t ce = cudaHostRegister(p, bytes, cudaHostRegisterDefault);
	if (ce != cudaSuccess) {
		free(p);
		return cuda_fail(c, ce, "cudaHostRegister");
	}
	if (!c->ev_made[buf]) {
		ce = cudaEventCreateWithFlags(&c->ev[buf], cudaEventDisableTiming);
		if (ce != cudaSuccess) {
			cudaHostUnregister(p);
			free(p);
			return cuda_fail(c, ce, "cudaEventCreate");
		}
		c->ev_made[buf] = 1;
	}
	*out = p;
	return 0;
}

static void c_free(void *ctx, void *p, int buf)
{
	cudaHostUnregister(p);
	free(p);
}

static int c_begin(void *ctx, const ds_tensor_ref *t, void **dst)
{
	ds_wload_cuda *c = ctx;
	const ds_tensor_ref *base = ds_weights_at(c->w, 0);
	size_t i = (size_t)(t - base);
	if (!base || t < base || i >= c->n || ds_weights_at(c->w, i) != t)
		return -EINVAL;
	size_t need = round_up(t->nbytes);
	if (need > c->arena_bytes - c->used)
		return -ENOSPC;
	c->ptrs[i] = c->arena + c->used;
	c->used += need;
	*dst = c->ptrs[i];
	return 0;
}

static int c_chunk(void *ctx, const ds_tensor_ref *t, void *dst, size_t off, const void *src, size_t len, int buf)
{
	ds_wload_cuda *c = ctx;
	cudaStream_t s = c->streams[buf % c->n_streams];
	cudaError_t ce = cudaMemcpyAsync((uint8_t *)dst + off, src, len, cudaMemcpyHostToDevice, s);
	if (ce != cudaSuccess)
		return cuda_fail(c, ce, "cudaMemcpyAsync");
	ce = cudaEventRecord(c->ev[buf], s);
	if (ce != cudaSuccess)
		return cuda_fail(c, ce, "cudaEventRecord");
	c->ev_pending[buf] = 1;
	return 0;
}

static int c_wait(void *ctx, int buf)
{
	ds_wload_cuda *c = ctx;
	if (!c->ev_pending[buf])
		return 0;
	c->ev_pending[buf] = 0;
	cudaError_t ce = cudaEventSynchronize(c->ev[buf]);
	return ce == cudaSuccess ? 0 : cuda_fail(c, ce, "cudaEventSynchronize");
}

int ds_wload_cuda_new(const ds_weights *w, void *arena, size_t arena_bytes, int n_streams, ds_wload_cuda **out)
{
	if (n_streams == 0)
		n_streams = 2;
	if (n_streams < 1 || n_streams > MAX_STREAMS || !arena)
		return -EINVAL;
	ds_wload_cuda *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->w = w;
	c->arena = arena;
	c->arena_bytes = arena_bytes;
	c->n = ds_weights_count(w);
	c->ptrs = calloc(c->n ? c->n : 1, sizeof(void *));
	if (!c->ptrs) {
		free(c);
		return -ENOMEM;
	}
	for (int i = 0; i < n_streams; i++) {
		if (cudaStreamCreateWithFlags(&c->streams[i], cudaStreamNonBlocking) != cudaSuccess) {
			ds_wload_cuda_free(c);
			return -EIO;
		}
		c->n_streams++;
	}
	*out = c;
	return 0;
}

void ds_wload_cuda_sink(ds_wload_cuda *c, ds_wload_sink *out)
{
	*out = (ds_wload_sink){ .ctx = c, .alloc_staging = c_alloc, .free_staging = c_free, .tensor_begin = c_begin,
				.chunk = c_chunk, .buffer_wait = c_wait };
}

void *ds_wload_cuda_ptr(const ds_wload_cuda *c, size_t i)
{
	return i < c->n ? c->ptrs[i] : NULL;
}

int ds_wload_cuda_sync(ds_wload_cuda *c)
{
	for (int i = 0; i < c->n_streams; i++) {
		cudaError_t ce = cudaStreamSynchronize(c->streams[i]);
		if (ce != cudaSuccess)
			return cuda_fail(c, ce, "cudaStreamSynchronize");
	}
	memset(c->ev_pending, 0, sizeof(c->ev_pending));
	return 0;
}

const char *ds_wload_cuda_error(const ds_wload_cuda *c)
{
	return c->err;
}

ds_wload_cuda *ds_wload_cuda_free(ds_wload_cuda *c)
{
	if (!c)
		return NULL;
	for (int i = 0; i < c->n_streams; i++) {
		cudaStreamSynchronize(c->streams[i]);
		cudaStreamDestroy(c->streams[i]);
	}
	for (int i = 0; i < MAX_BUFS; i++)
		if (c->ev_made[i])
			cudaEventDestroy(c->ev[i]);
	free(c->ptrs);
	free(c);
	return NULL;
}

#else
/* Without CUDA this file is empty; keep the translation unit non-empty. */
typedef int ds_wload_cuda_unused;
#endif

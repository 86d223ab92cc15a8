/* wload_cuda.h — a ds_wload_sink that lands tensors in GPU memory: staging
 * buffers pinned with cudaHostRegister, one cudaMemcpyAsync per piece on a
 * few streams, one event per staging buffer so a buffer is refilled only when
 * its copies are done. Destinations come from a device arena the caller owns.
 * Built only with DS_HAVE_CUDA; one thread (the loader's) uses a sink. */
#ifndef DS_WLOAD_CUDA_H
#define DS_WLOAD_CUDA_H

#include <stddef.h>

#include "model/weights.h"
#include "model/wload.h"

#ifdef DS_HAVE_CUDA

/* Tensors are placed at this alignment inside the arena. */
#define DS_WLOAD_CUDA_ALIGN 256u

typedef struct ds_wload_cuda ds_wload_cuda;

/* Bytes of arena that refs[0..n) (NULL: all of w) need. */
size_t ds_wload_cuda_arena_bytes(const ds_weights *w, const ds_tensor_ref *const *refs, size_t n);

/* arena: device memory of arena_bytes (cudaMalloc'ed by the caller, on the
 * current device); tensors are bump-allocated from it in the order the loader
 * begins them. n_streams: 1..16 (0: 2). */
int ds_wload_cuda_new(const ds_weights *w, void *arena, size_t arena_bytes, int n_streams, ds_wload_cuda **out);
void ds_wload_cuda_sink(ds_wload_cuda *c, ds_wload_sink *out);
/* Device address of tensor ds_weights_at(w, i), NULL if not loaded. */
void *ds_wload_cuda_ptr(const ds_wload_cuda *c, size_t i);
/* Waits for every copy; 0 or -EIO. */
int ds_wload_cuda_sync(ds_wload_cuda *c);
/* The CUDA error behind the last -EIO ("" if none). */
const char *ds_wload_cuda_error(const ds_wload_cuda *c);
ds_wload_cuda *ds_wload_cuda_free(ds_wload_cuda *c);

#endif
#endif

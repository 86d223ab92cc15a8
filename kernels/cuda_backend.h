/* cuda_backend.h — what ds_cuda_backend (declared in model/backend.h) tells
 * beyond the ops table: the KV pool it sized and the FP8 weights it had to
 * dequantize because cuBLASLt's block-scaled mode does not take their shape.
 * Same thread rules as the backend. */
#ifndef DS_CUDA_BACKEND_H
#define DS_CUDA_BACKEND_H

#include "model/backend.h"

extern const ds_backend_ops ds_cuda_backend;

int ds_cuda_backend_fallbacks(const ds_backend *b);
int ds_cuda_backend_kv_blocks(const ds_backend *b);
/* Steps of at most max_tokens tokens (default 1024) route experts without a
 * host round trip (grouped GEMVs; only such steps become CUDA graphs); 0
 * turns that path off. */
void ds_cuda_backend_set_device_moe(ds_backend *b, int max_tokens);
/* Steps over that bound run the routed experts as grouped GEMMs on the
 * device's plan where the layer takes them (default), or, on, plan them on
 * the host (row offsets copied back each layer, rows gathered; the path
 * every other layer takes). DS_CUDA_MOE_HOST_PLAN=1 at creation: on. */
void ds_cuda_backend_set_host_plan(ds_backend *b, int on);
/* Decode-sized GEMMs through the GEMV kernel (default) or cuBLASLt. */
void ds_cuda_backend_set_gemv(ds_backend *b, int on);

/* Decode-sized steps replayed as CUDA graphs (default on unless the backend
 * was created eager); off drops the captured graphs. */
int ds_cuda_backend_set_graphs(ds_backend *b, int on);
/* Kernels launched with programmatic dependent launch (kernels/launch.cuh;
 * default on) or plainly; process-wide; drops the captured graphs. */
void ds_cuda_backend_set_pdl(ds_backend *b, int on);
/* Steps replayed from a graph, graphs captured, steps launched kernel by
 * kernel while graphs were on (first use of a shape, or not capturable). */
void ds_cuda_backend_graph_stats(const ds_backend *b, long *replays, long *captures, long *eager);

/* Benchmarks: with profiling on, each step synchronizes after every phase
 * and adds its wall time to the phase (slower steps; off by default). */
enum { DS_CUDA_PHASES = 8 };
void ds_cuda_backend_set_profile(ds_backend *b, int on);
/* Seconds accumulated in phase p since profiling was turned on; its name. */
const char *ds_cuda_backend_profile(const ds_backend *b, int p, double *seconds);

#endif

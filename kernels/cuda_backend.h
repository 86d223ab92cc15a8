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

#endif

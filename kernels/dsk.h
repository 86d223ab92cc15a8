/* dsk.h — what every kernels/ launcher shares: the C view of device element
 * types, and the rule that launchers return 0 or -errno (CUDA errors become
 * -EIO, bad shapes -EINVAL) with the CUDA error text left in a ds_err.
 * Launchers are asynchronous on the stream they are given; any thread. */
#ifndef DSK_H
#define DSK_H

#include <errno.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "model/err.h"
#ifdef __cplusplus
}
#endif

#ifdef __cplusplus
#include <cuda_bf16.h>
typedef __nv_bfloat16 dsk_bf16;
#define DSK_EXTERN_C extern "C"
#else
typedef uint16_t dsk_bf16; /* bit pattern of a bfloat16 */
#define DSK_EXTERN_C
#endif

typedef struct CUstream_st *dsk_stream;

/* Kernels launch with programmatic dependent launch (kernels/launch.cuh)
 * unless this turned it off; process-wide, set before launching. */
DSK_EXTERN_C void dsk_set_pdl(int on);

/* Turns the last launch error into -EIO with its text in e. */
DSK_EXTERN_C int dsk_check(ds_err *e, const char *what);

#endif

/* dsk.cu — error conversion shared by the launchers. */
#include <cuda_runtime.h>
#include <errno.h>

#include "kernels/dsk.h"

extern "C" int dsk_check(ds_err *e, const char *what)
{
	cudaError_t err = cudaGetLastError();
	if (err == cudaSuccess)
		return 0;
	return ds_errf(e, -EIO, "cuda: %s: %s", what, cudaGetErrorString(err));
}

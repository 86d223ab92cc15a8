/* dsk.cu — error conversion shared by the launchers; the launch mode. */
#include <cuda_runtime.h>
#include <errno.h>

#include "kernels/dsk.h"
#include "kernels/launch.cuh"

int dsk_pdl_on = 1;

extern "C" void dsk_set_pdl(int on) { dsk_pdl_on = on; }

extern "C" int dsk_check(ds_err *e, const char *what)
{
	cudaError_t err = cudaGetLastError();
	if (err == cudaSuccess)
		return 0;
	return ds_errf(e, -EIO, "cuda: %s: %s", what, cudaGetErrorString(err));
}

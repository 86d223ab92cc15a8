#include "model/backend.h"

#include <string.h>

extern const ds_backend_ops ds_cuda_backend __attribute__((weak));

size_t ds_kv_block_bytes(const ds_model *m, int block_tokens)
{
	return sizeof(float) * (size_t)block_tokens * (size_t)(m->n_layers + m->n_mtp) *
	       (size_t)ds_config_kv_dim(&m->cfg);
}

const ds_backend_ops *ds_backend_find(const char *name)
{
	if (!name || !strcmp(name, "cpu"))
		return &ds_cpu_backend;
	/* Weak: kernels/ provides it when the CUDA backend is built in. */
	if (!strcmp(name, "cuda") && &ds_cuda_backend != NULL)
		return &ds_cuda_backend;
	return NULL;
}

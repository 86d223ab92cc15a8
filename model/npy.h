/* npy.h — NumPy .npy (format 1.0) float32 arrays: written by `dsd logits`,
 * read by tests to compare with reference logits. Any thread. */
#ifndef DS_NPY_H
#define DS_NPY_H

#include <stddef.h>

#include "model/err.h"

/* Writes data[rows][cols] as little-endian float32, C order. */
int ds_npy_write_f32(const char *path, const float *data, size_t rows, size_t cols, ds_err *e);
/* Reads a 1-D or 2-D '<f4' C-order array; *data is malloc'ed. 1-D gives rows=1. */
int ds_npy_read_f32(const char *path, float **data, size_t *rows, size_t *cols, ds_err *e);

#endif

/* weights.h — the tensors of a model directory: model.safetensors or the
 * shards named by model.safetensors.index.json, looked up by name.
 * A ds_weights owns its shards (mmap'ed unless DS_WEIGHTS_NO_MAP) and the
 * tensor table; refs stay valid until ds_weights_free. Read-only after open,
 * so any number of threads may read it. */
#ifndef DS_WEIGHTS_H
#define DS_WEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#include "model/dtype.h"
#include "model/err.h"
#include "model/safetensors.h"

typedef struct ds_tensor_ref {
	const char *name;
	ds_dtype dtype;
	int ndim;
	int64_t shape[DS_ST_MAX_DIMS];
	int shard;             /* index into ds_weights_shard_path */
	uint64_t file_offset;  /* absolute offset of the data in its shard */
	size_t nbytes;
	const void *data;      /* into the mapping; NULL with DS_WEIGHTS_NO_MAP */
	int used;              /* set by the model loader; unused ones are reported */
} ds_tensor_ref;

typedef struct ds_weights ds_weights;

enum { DS_WEIGHTS_NO_MAP = 1 };

int ds_weights_open(const char *dir, unsigned flags, ds_weights **out, ds_err *e);
ds_weights *ds_weights_free(ds_weights *w);

ds_tensor_ref *ds_weights_find(const ds_weights *w, const char *name);
size_t ds_weights_count(const ds_weights *w);
ds_tensor_ref *ds_weights_at(const ds_weights *w, size_t i);
int ds_weights_shard_count(const ds_weights *w);
const char *ds_weights_shard_path(const ds_weights *w, int shard);
const ds_st_header *ds_weights_shard_header(const ds_weights *w, int shard);

#endif

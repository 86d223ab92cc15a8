/* safetensors.h — parser for the safetensors header and a mapped shard.
 * ds_st_parse is pure (fuzzed by tests/fuzz/fuzz_safetensors.c): it checks
 * every offset against the file size and rejects overlaps, so later code can
 * trust a parsed header. ds_st_file owns its fd and mapping. Any thread. */
#ifndef DS_SAFETENSORS_H
#define DS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "model/dtype.h"
#include "model/err.h"

#define DS_ST_MAX_DIMS 8
/* Headers larger than this are refused (the format's reference says 100 MB). */
#define DS_ST_MAX_HEADER (100u << 20)

typedef struct ds_st_tensor {
	char *name;
	ds_dtype dtype;
	int ndim;
	int64_t shape[DS_ST_MAX_DIMS];
	uint64_t begin, end; /* byte offsets relative to data_start */
} ds_st_tensor;

typedef struct ds_st_header {
	ds_st_tensor *tensors; /* sorted by begin offset */
	size_t n;
	uint64_t data_start; /* 8 + header length */
	uint64_t file_size;
} ds_st_header;

/* Parses the header found at buf (the file's first buf_len bytes; at least
 * 8 + header length of them) of a file of file_size bytes. path is only used
 * in messages. On success fills *out (free with ds_st_header_free). */
int ds_st_parse(const uint8_t *buf, size_t buf_len, uint64_t file_size,
		const char *path, ds_st_header *out, ds_err *e);
void ds_st_header_free(ds_st_header *h);

/* Reads and parses only the header with pread (no mapping); for loaders that
 * stream the data themselves (io_uring). */
int ds_st_read_header(const char *path, ds_st_header *out, ds_err *e);

typedef struct ds_st_file {
	char *path;
	int fd;
	const uint8_t *map; /* whole file, read-only, or NULL when not mapped */
	size_t map_len;
	ds_st_header hdr;
} ds_st_file;

/* Opens, mmaps and parses a shard. */
int ds_st_open(const char *path, ds_st_file **out, ds_err *e);
ds_st_file *ds_st_close(ds_st_file *f);

#endif

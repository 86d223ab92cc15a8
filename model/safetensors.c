#include "model/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static int cmp_begin(const void *a, const void *b)
{
	const ds_st_tensor *x = a, *y = b;
	return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : 0;
}

void ds_st_header_free(ds_st_header *h)
{
	if (!h)
		return;
	for (size_t i = 0; i < h->n; i++)
		free(h->tensors[i].name);
	free(h->tensors);
	memset(h, 0, sizeof(*h));
}

/* Shapes and offsets arrive as JSON numbers (doubles); anything that is not
 * a non-negative integer below 2^53 is refused rather than rounded. */
static int json_u64(const cJSON *v, uint64_t *out)
{
	if (!cJSON_IsNumber(v))
		return -1;
	double d = v->valuedouble;
	if (!(d >= 0) || d > 9007199254740992.0 || d != (double)(uint64_t)d)
		return -1;
	*out = (uint64_t)d;
	return 0;
}

static int parse_tensor(const cJSON *item, const char *path, uint64_t data_len,
			ds_st_tensor *t, ds_err *e)
{
	const char *name = item->string;
	if (!cJSON_IsObject(item))
		return ds_errf(e, -EINVAL, "%s: tensor '%s': entry is not an object", path, name);
	const cJSON *dt = cJSON_GetObjectItemCaseSensitive(item, "dtype");
	const cJSON *sh = cJSON_GetObjectItemCaseSensitive(item, "shape");
	const cJSON *off = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
	if (!cJSON_IsString(dt) || !cJSON_IsArray(sh) || !cJSON_IsArray(off))
		return ds_errf(e, -EINVAL, "%s: tensor '%s': needs dtype, shape and data_offsets", path, name);
	t->dtype = ds_dtype_from_name(dt->valuestring, strlen(dt->valuestring));
	if (t->dtype == DS_DT_INVALID)
		return ds_errf(e, -EINVAL, "%s: tensor '%s': unknown dtype '%s'", path, name, dt->valuestring);
	int nd = cJSON_GetArraySize(sh);
	if (nd > DS_ST_MAX_DIMS)
		return ds_errf(e, -EINVAL, "%s: tensor '%s': %d dimensions (at most %d)", path, name, nd, DS_ST_MAX_DIMS);
	t->ndim = nd;
	/* Element count overflow is checked against the data length, which is
	 * bounded by the file size, so the product can be kept below 2^63. */
	uint64_t count = 1;
	for (int i = 0; i < nd; i++) {
		uint64_t d;
		if (json_u64(cJSON_GetArrayItem(sh, i), &d) != 0)
			return ds_errf(e, -EINVAL, "%s: tensor '%s': bad shape", path, name);
		t->shape[i] = (int64_t)d;
		if (d != 0 && count > (UINT64_MAX >> 8) / d)
			return ds_errf(e, -EINVAL, "%s: tensor '%s': shape too large", path, name);
		count *= d;
	}
	uint64_t b, en;
	if (cJSON_GetArraySize(off) != 2 || json_u64(cJSON_GetArrayItem(off, 0), &b) ||
	    json_u64(cJSON_GetArrayItem(off, 1), &en))
		return ds_errf(e, -EINVAL, "%s: tensor '%s': bad data_offsets", path, name);
	if (b > en || en > data_len)
		return ds_errf(e, -EINVAL,
			       "%s: tensor '%s': data_offsets [%llu, %llu) outside the data (%llu bytes)",
			       path, name, (unsigned long long)b, (unsigned long long)en,
			       (unsigned long long)data_len);
	if (en - b != count * ds_dtype_size(t->dtype))
		return ds_errf(e, -EINVAL, "%s: tensor '%s': %llu bytes for shape of %llu %s elements",
			       path, name, (unsigned long long)(en - b), (unsigned long long)count,
			       ds_dtype_name(t->dtype));
	t->begin = b;
	t->end = en;
	t->name = strdup(name);
	return t->name ? 0 : -ENOMEM;
}

int ds_st_parse(const uint8_t *buf, size_t buf_len, uint64_t file_size, const char *path,
		ds_st_header *out, ds_err *e)
{
	memset(out, 0, sizeof(*out));
	if (buf_len < 8 || file_size < 8)
		return ds_errf(e, -EINVAL, "%s: truncated: %llu bytes, no header length", path,
			       (unsigned long long)file_size);
	uint64_t hlen = 0;
	for (int i = 7; i >= 0; i--)
		hlen = (hlen << 8) | buf[i];
	if (hlen > DS_ST_MAX_HEADER)
		return ds_errf(e, -EINVAL, "%s: header length %llu is over the %u byte limit", path,
			       (unsigned long long)hlen, DS_ST_MAX_HEADER);
	if (8 + hlen > file_size)
		return ds_errf(e, -EINVAL, "%s: header length %llu runs past the end of the file (%llu bytes)",
			       path, (unsigned long long)hlen, (unsigned long long)file_size);
	if (8 + hlen > buf_len)
		return ds_errf(e, -EINVAL, "%s: header not fully read", path);
	cJSON *root = cJSON_ParseWithLength((const char *)buf + 8, (size_t)hlen);
	if (!root || !cJSON_IsObject(root)) {
		cJSON_Delete(root);
		return ds_errf(e, -EINVAL, "%s: header is not a JSON object", path);
	}
	int rc = 0;
	size_t cap = (size_t)cJSON_GetArraySize(root);
	out->tensors = calloc(cap ? cap : 1, sizeof(ds_st_tensor));
	if (!out->tensors) {
		cJSON_Delete(root);
		return -ENOMEM;
	}
	out->data_start = 8 + hlen;
	out->file_size = file_size;
	uint64_t data_len = file_size - out->data_start;
	for (cJSON *it = root->child; it; it = it->next) {
		if (!it->string) {
			rc = ds_errf(e, -EINVAL, "%s: header entry without a name", path);
			break;
		}
		if (!strcmp(it->string, "__metadata__")) {
			if (!cJSON_IsObject(it)) {
				rc = ds_errf(e, -EINVAL, "%s: __metadata__ is not an object", path);
				break;
			}
			continue;
		}
		rc = parse_tensor(it, path, data_len, &out->tensors[out->n], e);
		if (rc)
			break;
		out->n++;
	}
	cJSON_Delete(root);
	if (rc == 0 && out->n > 1) {
		qsort(out->tensors, out->n, sizeof(ds_st_tensor), cmp_begin);
		for (size_t i = 0; i + 1 < out->n; i++) {
			const ds_st_tensor *a = &out->tensors[i], *b = &out->tensors[i + 1];
			if (b->begin < a->end && b->end > b->begin && a->end > a->begin) {
				rc = ds_errf(e, -EINVAL, "%s: tensors '%s' and '%s' overlap", path, a->name, b->name);
				break;
			}
			if (!strcmp(a->name, b->name)) {
				rc = ds_errf(e, -EINVAL, "%s: tensor '%s' appears twice", path, a->name);
				break;
			}
		}
	}
	if (rc)
		ds_st_header_free(out);
	return rc;
}

int ds_st_read_header(const char *path, ds_st_header *out, ds_err *e)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return ds_errf(e, -errno, "%s: %s", path, strerror(errno));
	struct stat st;
	uint8_t len8[8];
	int rc;
	if (fstat(fd, &st) != 0) {
		rc = ds_errf(e, -errno, "%s: %s", path, strerror(errno));
		goto out;
	}
	if (pread(fd, len8, 8, 0) != 8) {
		rc = ds_errf(e, -EINVAL, "%s: truncated: no header length", path);
		goto out;
	}
	uint64_t hlen = 0;
	for (int i = 7; i >= 0; i--)
		hlen = (hlen << 8) | len8[i];
	if (hlen > DS_ST_MAX_HEADER || 8 + hlen > (uint64_t)st.st_size) {
		rc = ds_st_parse(len8, 8, (uint64_t)st.st_size, path, out, e);
		goto out;
	}
	uint8_t *buf = malloc(8 + hlen);
	if (!buf) {
		rc = -ENOMEM;
		goto out;
	}
	memcpy(buf, len8, 8);
	if (pread(fd, buf + 8, hlen, 8) != (ssize_t)hlen) {
		free(buf);
		rc = ds_errf(e, -EIO, "%s: short read of the header", path);
		goto out;
	}
	rc = ds_st_parse(buf, 8 + hlen, (uint64_t)st.st_size, path, out, e);
	free(buf);
out:
	close(fd);
	return rc;
}

int ds_st_open(const char *path, ds_st_file **out, ds_err *e)
{
	ds_st_file *f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->fd = -1;
	f->path = strdup(path);
	int rc;
	if (!f->path) {
		rc = -ENOMEM;
		goto fail;
	}
	f->fd = open(path, O_RDONLY | O_CLOEXEC);
	if (f->fd < 0) {
		rc = ds_errf(e, -errno, "%s: %s", path, strerror(errno));
		goto fail;
	}
	struct stat st;
	if (fstat(f->fd, &st) != 0) {
		rc = ds_errf(e, -errno, "%s: %s", path, strerror(errno));
		goto fail;
	}
	if (st.st_size < 8) {
		rc = ds_errf(e, -EINVAL, "%s: truncated: %lld bytes, no header length", path, (long long)st.st_size);
		goto fail;
	}
	f->map_len = (size_t)st.st_size;
	void *m = mmap(NULL, f->map_len, PROT_READ, MAP_PRIVATE, f->fd, 0);
	if (m == MAP_FAILED) {
		rc = ds_errf(e, -errno, "%s: mmap: %s", path, strerror(errno));
		goto fail;
	}
	f->map = m;
	rc = ds_st_parse(f->map, f->map_len, f->map_len, path, &f->hdr, e);
	if (rc)
		goto fail;
	*out = f;
	return 0;
fail:
	ds_st_close(f);
	return rc;
}

ds_st_file *ds_st_close(ds_st_file *f)
{
	if (!f)
		return NULL;
	if (f->map)
		munmap((void *)f->map, f->map_len);
	if (f->fd >= 0)
		close(f->fd);
	ds_st_header_free(&f->hdr);
	free(f->path);
	free(f);
	return NULL;
}

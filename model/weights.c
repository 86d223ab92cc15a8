#include "model/weights.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct ds_weights {
	char *dir;
	int n_shards;
	char **shard_paths;
	ds_st_file **files;   /* mapped shards (NULL entries with NO_MAP) */
	ds_st_header *hdrs;   /* one per shard */
	ds_tensor_ref *refs;
	size_t n_refs;
	size_t *table;        /* open addressing: index+1, 0 = empty */
	size_t table_cap;
};

static uint64_t hash_str(const char *s)
{
	uint64_t h = 1469598103934665603ull;
	while (*s)
		h = (h ^ (unsigned char)*s++) * 1099511628211ull;
	return h;
}

static int table_build(ds_weights *w, ds_err *e)
{
	size_t cap = 16;
	while (cap < w->n_refs * 2)
		cap <<= 1;
	w->table = calloc(cap, sizeof(size_t));
	if (!w->table)
		return -ENOMEM;
	w->table_cap = cap;
	for (size_t i = 0; i < w->n_refs; i++) {
		size_t j = hash_str(w->refs[i].name) & (cap - 1);
		while (w->table[j]) {
			if (!strcmp(w->refs[w->table[j] - 1].name, w->refs[i].name))
				return ds_errf(e, -EINVAL, "%s: tensor '%s' is stored twice (in %s and %s)", w->dir,
					       w->refs[i].name, w->shard_paths[w->refs[w->table[j] - 1].shard],
					       w->shard_paths[w->refs[i].shard]);
			j = (j + 1) & (cap - 1);
		}
		w->table[j] = i + 1;
	}
	return 0;
}

ds_tensor_ref *ds_weights_find(const ds_weights *w, const char *name)
{
	size_t j = hash_str(name) & (w->table_cap - 1);
	while (w->table[j]) {
		ds_tensor_ref *r = &w->refs[w->table[j] - 1];
		if (!strcmp(r->name, name))
			return r;
		j = (j + 1) & (w->table_cap - 1);
	}
	return NULL;
}

size_t ds_weights_count(const ds_weights *w) { return w->n_refs; }
ds_tensor_ref *ds_weights_at(const ds_weights *w, size_t i) { return i < w->n_refs ? &w->refs[i] : NULL; }
int ds_weights_shard_count(const ds_weights *w) { return w->n_shards; }
const char *ds_weights_shard_path(const ds_weights *w, int s) { return w->shard_paths[s]; }
const ds_st_header *ds_weights_shard_header(const ds_weights *w, int s) { return &w->hdrs[s]; }

ds_weights *ds_weights_free(ds_weights *w)
{
	if (!w)
		return NULL;
	for (int i = 0; i < w->n_shards; i++) {
		if (w->files && w->files[i])
			ds_st_close(w->files[i]); /* owns its header copy */
		else if (w->hdrs)
			ds_st_header_free(&w->hdrs[i]);
		if (w->shard_paths)
			free(w->shard_paths[i]);
	}
	free(w->files);
	free(w->hdrs);
	free(w->shard_paths);
	free(w->refs);
	free(w->table);
	free(w->dir);
	free(w);
	return NULL;
}

static char *read_file(const char *path, size_t *len, ds_err *e, int *rc)
{
	FILE *f = fopen(path, "rb");
	if (!f) {
		*rc = ds_errf(e, -errno, "%s: %s", path, strerror(errno));
		return NULL;
	}
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	char *buf = n >= 0 ? malloc((size_t)n + 1) : NULL;
	if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
		fclose(f);
		free(buf);
		*rc = ds_errf(e, -EIO, "%s: cannot read", path);
		return NULL;
	}
	fclose(f);
	buf[n] = 0;
	*len = (size_t)n;
	return buf;
}

static int add_shard(ds_weights *w, const char *file)
{
	for (int i = 0; i < w->n_shards; i++)
		if (!strcmp(strrchr(w->shard_paths[i], '/') + 1, file))
			return i;
	char **np = realloc(w->shard_paths, sizeof(char *) * (size_t)(w->n_shards + 1));
	if (!np)
		return -ENOMEM;
	w->shard_paths = np;
	size_t l = strlen(w->dir) + strlen(file) + 2;
	char *p = malloc(l);
	if (!p)
		return -ENOMEM;
	snprintf(p, l, "%s/%s", w->dir, file);
	w->shard_paths[w->n_shards] = p;
	return w->n_shards++;
}

/* Shard names come from a file the user supplied: keep them inside the dir. */
static int shard_name_ok(const char *s)
{
	return *s && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..");
}

static int read_index(ds_weights *w, const char *ipath, cJSON **out_map, ds_err *e)
{
	size_t len;
	int rc = 0;
	char *text = read_file(ipath, &len, e, &rc);
	if (!text)
		return rc;
	cJSON *root = cJSON_ParseWithLength(text, len);
	free(text);
	const cJSON *map = root ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
	if (!cJSON_IsObject(map)) {
		cJSON_Delete(root);
		return ds_errf(e, -EINVAL, "%s: not JSON with a \"weight_map\" object", ipath);
	}
	for (const cJSON *it = map->child; it; it = it->next) {
		if (!cJSON_IsString(it) || !shard_name_ok(it->valuestring)) {
			cJSON_Delete(root);
			return ds_errf(e, -EINVAL, "%s: bad shard name for tensor '%s'", ipath,
				       it->string ? it->string : "?");
		}
		rc = add_shard(w, it->valuestring);
		if (rc < 0) {
			cJSON_Delete(root);
			return rc;
		}
	}
	*out_map = root;
	return 0;
}

int ds_weights_open(const char *dir, unsigned flags, ds_weights **out, ds_err *e)
{
	ds_weights *w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	int rc = 0;
	cJSON *index = NULL;
	w->dir = strdup(dir);
	if (!w->dir) {
		rc = -ENOMEM;
		goto fail;
	}
	char ipath[PATH_MAX];
	struct stat st;
	snprintf(ipath, sizeof(ipath), "%s/model.safetensors.index.json", dir);
	if (stat(ipath, &st) == 0) {
		rc = read_index(w, ipath, &index, e);
		if (rc)
			goto fail;
		if (w->n_shards == 0) {
			rc = ds_errf(e, -EINVAL, "%s: weight_map is empty", ipath);
			goto fail;
		}
	} else {
		rc = add_shard(w, "model.safetensors");
		if (rc < 0)
			goto fail;
		if (stat(w->shard_paths[0], &st) != 0) {
			rc = ds_errf(e, -ENOENT, "%s: neither model.safetensors nor model.safetensors.index.json", dir);
			goto fail;
		}
	}
	w->files = calloc((size_t)w->n_shards, sizeof(*w->files));
	w->hdrs = calloc((size_t)w->n_shards, sizeof(*w->hdrs));
	if (!w->files || !w->hdrs) {
		rc = -ENOMEM;
		goto fail;
	}
	size_t total = 0;
	for (int i = 0; i < w->n_shards; i++) {
		if (flags & DS_WEIGHTS_NO_MAP) {
			rc = ds_st_read_header(w->shard_paths[i], &w->hdrs[i], e);
		} else {
			rc = ds_st_open(w->shard_paths[i], &w->files[i], e);
			if (rc == 0)
				w->hdrs[i] = w->files[i]->hdr;
		}
		if (rc)
			goto fail;
		total += w->hdrs[i].n;
	}
	w->refs = calloc(total ? total : 1, sizeof(ds_tensor_ref));
	if (!w->refs) {
		rc = -ENOMEM;
		goto fail;
	}
	for (int i = 0; i < w->n_shards; i++) {
		for (size_t j = 0; j < w->hdrs[i].n; j++) {
			const ds_st_tensor *t = &w->hdrs[i].tensors[j];
			ds_tensor_ref *r = &w->refs[w->n_refs++];
			r->name = t->name;
			r->dtype = t->dtype;
			r->ndim = t->ndim;
			memcpy(r->shape, t->shape, sizeof(r->shape));
			r->shard = i;
			r->file_offset = w->hdrs[i].data_start + t->begin;
			r->nbytes = (size_t)(t->end - t->begin);
			r->data = w->files[i] ? w->files[i]->map + r->file_offset : NULL;
		}
	}
	rc = table_build(w, e);
	if (rc)
		goto fail;
	if (index) {
		const cJSON *map = cJSON_GetObjectItemCaseSensitive(index, "weight_map");
		for (const cJSON *it = map->child; it; it = it->next) {
			ds_tensor_ref *r = ds_weights_find(w, it->string);
			if (!r) {
				rc = ds_errf(e, -EINVAL, "%s/%s: tensor '%s' named by the index is missing", dir,
					     it->valuestring, it->string);
				goto fail;
			}
			if (strcmp(strrchr(w->shard_paths[r->shard], '/') + 1, it->valuestring)) {
				rc = ds_errf(e, -EINVAL, "%s: tensor '%s' is in %s, the index says %s", dir, it->string,
					     w->shard_paths[r->shard], it->valuestring);
				goto fail;
			}
		}
		cJSON_Delete(index);
		index = NULL;
	}
	*out = w;
	return 0;
fail:
	cJSON_Delete(index);
	ds_weights_free(w);
	return rc;
}

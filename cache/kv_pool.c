#include "cache/kv_pool.h"

#include <errno.h>
#include <stdlib.h>

struct ds_kv_pool {
	int n_blocks;
	int block_tokens;
	int *refs;       /* per block reference count */
	unsigned char *in_free;
	int32_t *free_list; /* stack of free block ids */
	int n_free;
	ds_kv_pool_hooks hooks;
};

int ds_kv_pool_new(int n_blocks, int block_tokens, ds_kv_pool **out)
{
	if (n_blocks <= 0 || block_tokens <= 0)
		return -EINVAL;
	ds_kv_pool *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->n_blocks = n_blocks;
	p->block_tokens = block_tokens;
	p->refs = calloc((size_t)n_blocks, sizeof(int));
	p->in_free = calloc((size_t)n_blocks, 1);
	p->free_list = malloc((size_t)n_blocks * sizeof(int32_t));
	if (!p->refs || !p->in_free || !p->free_list) {
		ds_kv_pool_free(p);
		return -ENOMEM;
	}
	/* Pushed in reverse so block 0 is handed out first: easier to read in tests. */
	for (int i = 0; i < n_blocks; i++) {
		p->free_list[i] = n_blocks - 1 - i;
		p->in_free[i] = 1;
	}
	p->n_free = n_blocks;
	*out = p;
	return 0;
}

ds_kv_pool *ds_kv_pool_free(ds_kv_pool *p)
{
	if (p) {
		free(p->refs);
		free(p->in_free);
		free(p->free_list);
		free(p);
	}
	return NULL;
}

int32_t ds_kv_pool_alloc(ds_kv_pool *p)
{
	if (p->n_free == 0 && p->hooks.reclaim)
		p->hooks.reclaim(p->hooks.ctx, 1);
	if (p->n_free == 0)
		return -ENOSPC;
	int32_t b = p->free_list[--p->n_free];
	p->in_free[b] = 0;
	p->refs[b] = 1;
	return b;
}

void ds_kv_pool_ref(ds_kv_pool *p, int32_t b)
{
	if (b < 0 || b >= p->n_blocks || p->in_free[b])
		return;
	if (p->refs[b]++ == 0 && p->hooks.on_acquire)
		p->hooks.on_acquire(p->hooks.ctx, b);
}

void ds_kv_pool_release(ds_kv_pool *p, int32_t b)
{
	if (b < 0 || b >= p->n_blocks || p->refs[b] != 0 || p->in_free[b])
		return;
	p->in_free[b] = 1;
	p->free_list[p->n_free++] = b;
}

void ds_kv_pool_unref(ds_kv_pool *p, int32_t b)
{
	if (b < 0 || b >= p->n_blocks || p->refs[b] <= 0)
		return;
	if (--p->refs[b] > 0)
		return;
	if (p->hooks.on_release && p->hooks.on_release(p->hooks.ctx, b))
		return;
	ds_kv_pool_release(p, b);
}

int ds_kv_pool_refcount(const ds_kv_pool *p, int32_t b)
{
	return (b >= 0 && b < p->n_blocks) ? p->refs[b] : -EINVAL;
}

int ds_kv_pool_blocks(const ds_kv_pool *p) { return p->n_blocks; }
int ds_kv_pool_block_tokens(const ds_kv_pool *p) { return p->block_tokens; }
int ds_kv_pool_free_count(const ds_kv_pool *p) { return p->n_free; }

void ds_kv_pool_set_hooks(ds_kv_pool *p, const ds_kv_pool_hooks *h)
{
	if (h)
		p->hooks = *h;
	else
		p->hooks = (ds_kv_pool_hooks){ 0 };
}

/* kv_pool.h — accounting for the fixed-size blocks of the KV pool.
 * The backend owns the memory; this owns which block is free and how many
 * references each has (sequences and the prefix cache share blocks).
 * Not thread-safe: the engine thread owns it. */
#ifndef DS_KV_POOL_H
#define DS_KV_POOL_H

#include <stdint.h>

typedef struct ds_kv_pool ds_kv_pool;

int ds_kv_pool_new(int n_blocks, int block_tokens, ds_kv_pool **out);
ds_kv_pool *ds_kv_pool_free(ds_kv_pool *p);

/* A free block with one reference, or -ENOSPC. When a reclaim hook is set
 * (the prefix cache), it is asked to release cached blocks first. */
int32_t ds_kv_pool_alloc(ds_kv_pool *p);
void ds_kv_pool_ref(ds_kv_pool *p, int32_t block);
/* Drops a reference; at zero the block is free (or handed to the hook). */
void ds_kv_pool_unref(ds_kv_pool *p, int32_t block);
int ds_kv_pool_refcount(const ds_kv_pool *p, int32_t block);

int ds_kv_pool_blocks(const ds_kv_pool *p);
int ds_kv_pool_block_tokens(const ds_kv_pool *p);
int ds_kv_pool_free_count(const ds_kv_pool *p);

/* Hooks for the prefix cache: on_release(block) is called when a block's
 * count drops to zero; returning 1 means "the cache keeps it" (it stays out
 * of the free list until ds_kv_pool_release). reclaim() is called when the
 * free list is empty and should ds_kv_pool_release some blocks.
 * on_acquire(block) (optional) is called when a kept zero-reference block
 * is referenced again (a prefix-cache hit), so the cache stops counting it
 * as evictable. */
typedef struct ds_kv_pool_hooks {
	void *ctx;
	int (*on_release)(void *ctx, int32_t block);
	int (*reclaim)(void *ctx, int want);
	void (*on_acquire)(void *ctx, int32_t block);
} ds_kv_pool_hooks;
void ds_kv_pool_set_hooks(ds_kv_pool *p, const ds_kv_pool_hooks *h);
/* Returns a zero-reference block kept by the cache to the free list. */
void ds_kv_pool_release(ds_kv_pool *p, int32_t block);

#endif

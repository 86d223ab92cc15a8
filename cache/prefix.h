/* prefix.h — the prefix cache: full KV blocks keyed by the tokens before and in them.
 * A tree with one node per cached block (children found by exact token match); it keeps
 * blocks whose last sequence let go and gives them back, least recently used leaf first,
 * when the pool runs dry (it installs the pool's hooks). It never holds block references
 * itself. Not thread-safe: the engine thread owns it, as it owns the pool. */
#ifndef DS_PREFIX_H
#define DS_PREFIX_H

#include <stdint.h>

#include "cache/kv_pool.h"

typedef struct ds_prefix ds_prefix;

typedef struct ds_prefix_stats {
	uint64_t prompt_tokens; /* as reported by ds_prefix_account */
	uint64_t hit_tokens;    /* of which served from the cache */
	uint64_t evictions;     /* blocks handed back to the pool by eviction (not flush) */
	uint64_t inserted;      /* blocks ever added to the tree */
	int blocks_total;       /* the pool */
	int blocks_used;        /* referenced by at least one sequence */
	int blocks_cached;      /* in the tree, unreferenced: evictable */
	int blocks_free;        /* on the pool's free list */
	int nodes;              /* blocks in the tree, referenced or not */
} ds_prefix_stats;

/* Installs itself as p's hooks; p must outlive it. */
int ds_prefix_new(ds_kv_pool *p, ds_prefix **out);
/* Flushes, removes the hooks. Accepts NULL. Sequences may outlive it. */
ds_prefix *ds_prefix_free(ds_prefix *pc);

/* The longest cached prefix of tokens[0..n) made of full blocks, leaving at
 * least the last token uncached (its logits start the generation). Writes up
 * to max_blocks block ids and returns the number of tokens they hold (a
 * multiple of the block size). Takes no references: hand the blocks to
 * ds_seq_adopt_blocks before anything allocates from the pool. */
int ds_prefix_lookup(ds_prefix *pc, const int32_t *tokens, int n, int32_t *blocks, int max_blocks);

/* Records the full blocks of a sequence: blocks[i] holds the KV of tokens
 * [i*B, (i+1)*B) and tokens[0..n) are final (n may include a partial tail,
 * which is ignored). Blocks must be referenced by the caller's sequence and
 * their KV must never be rewritten while cached. Where the tree already has
 * another block for the same tokens the caller's block stays private.
 * Returns the number of blocks newly added. */
int ds_prefix_insert(ds_prefix *pc, const int32_t *tokens, int n, const int32_t *blocks, int n_blocks);

/* Statistics of admitted prompts: prompt tokens and how many came from the cache. */
void ds_prefix_account(ds_prefix *pc, int prompt_tokens, int hit_tokens);

/* Gives up to want unreferenced cached blocks back to the pool, least recently
 * used leaves first. Returns the number released. */
int ds_prefix_evict(ds_prefix *pc, int want);
/* Forgets every cached prefix: unreferenced blocks go back to the pool now,
 * referenced ones when their sequences release them. Returns blocks released. */
int ds_prefix_flush(ds_prefix *pc);

ds_kv_pool *ds_prefix_pool(const ds_prefix *pc);
/* Unreferenced cached blocks (an allocation can get free + this many). */
int ds_prefix_cached(const ds_prefix *pc);
void ds_prefix_stats_get(const ds_prefix *pc, ds_prefix_stats *st);
/* Checks the tree, heap and counters against the pool: 0 or -EFAULT (tests). */
int ds_prefix_check(const ds_prefix *pc);

#endif

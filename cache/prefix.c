#include "cache/prefix.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* One node per pool block, indexed by block id. A block in the tree holds the
 * KV of the block-sized token run stored with it, given every token on the path
 * from the root: that is exactly what the block's KV depends on, so the path is
 * the key and a match is exact (no hash is trusted without comparing tokens). */
typedef struct node {
	int32_t parent;                   /* block id, -1 = root */
	int32_t first_child, next_sib, prev_sib;
	int32_t hnext;                    /* hash chain */
	int n_children;
	uint32_t hash;
	int heap_pos;                     /* -1: not an evictable leaf */
	uint64_t tick;                    /* when it last became unreferenced */
	unsigned char in_tree, cached;    /* cached: in the tree with no references */
} node;

struct ds_prefix {
	ds_kv_pool *pool;
	int nb, bt;
	node *nodes;
	int32_t *tokens;                  /* [nb][bt] */
	int32_t *buckets;
	uint32_t mask;
	int32_t *heap;                    /* evictable leaves, min (tick, block) on top */
	int heap_n;
	int32_t *stack;                   /* scratch for subtree walks */
	uint64_t tick;
	int n_cached, n_nodes;
	uint64_t prompt_tokens, hit_tokens, evictions, inserted;
};

static uint32_t block_hash(int32_t parent, const int32_t *t, int bt)
{
	uint64_t h = 0x9e3779b97f4a7c15ull ^ (uint64_t)(uint32_t)parent;
	for (int i = 0; i < bt; i++) {
		h ^= (uint32_t)t[i];
		h *= 0xff51afd7ed558ccdull;
		h ^= h >> 29;
	}
	return (uint32_t)(h ^ (h >> 32));
}

/* ---- evictable-leaf heap ---- */

static int heap_less(const ds_prefix *pc, int32_t a, int32_t b)
{
	const node *x = &pc->nodes[a], *y = &pc->nodes[b];
	return x->tick < y->tick || (x->tick == y->tick && a < b);
}

static void heap_set(ds_prefix *pc, int i, int32_t b)
{
	pc->heap[i] = b;
	pc->nodes[b].heap_pos = i;
}

static void heap_up(ds_prefix *pc, int i)
{
	int32_t b = pc->heap[i];
	while (i > 0) {
		int p = (i - 1) / 2;
		if (!heap_less(pc, b, pc->heap[p]))
			break;
		heap_set(pc, i, pc->heap[p]);
		i = p;
	}
	heap_set(pc, i, b);
}

static void heap_down(ds_prefix *pc, int i)
{
	int32_t b = pc->heap[i];
	for (;;) {
		int c = 2 * i + 1;
		if (c >= pc->heap_n)
			break;
		if (c + 1 < pc->heap_n && heap_less(pc, pc->heap[c + 1], pc->heap[c]))
			c++;
		if (!heap_less(pc, pc->heap[c], b))
			break;
		heap_set(pc, i, pc->heap[c]);
		i = c;
	}
	heap_set(pc, i, b);
}

static void heap_push(ds_prefix *pc, int32_t b)
{
	if (pc->nodes[b].heap_pos >= 0)
		return;
	pc->heap[pc->heap_n] = b;
	pc->nodes[b].heap_pos = pc->heap_n++;
	heap_up(pc, pc->heap_n - 1);
}

static void heap_remove(ds_prefix *pc, int32_t b)
{
	int i = pc->nodes[b].heap_pos;
	if (i < 0)
		return;
	pc->nodes[b].heap_pos = -1;
	int32_t last = pc->heap[--pc->heap_n];
	if (i == pc->heap_n)
		return;
	heap_set(pc, i, last);
	heap_up(pc, i);
	heap_down(pc, pc->nodes[last].heap_pos);
}

/* ---- tree ---- */

static int32_t find_child(const ds_prefix *pc, int32_t parent, const int32_t *t, uint32_t h)
{
	for (int32_t b = pc->buckets[h & pc->mask]; b >= 0; b = pc->nodes[b].hnext) {
		const node *n = &pc->nodes[b];
		if (n->hash == h && n->parent == parent &&
		    !memcmp(pc->tokens + (size_t)b * (size_t)pc->bt, t, sizeof(int32_t) * (size_t)pc->bt))
			return b;
	}
	return -1;
}

static int is_evictable_leaf(const node *n)
{
	return n->in_tree && n->cached && n->n_children == 0;
}

/* Takes b out of the tree (its children must be gone); a cached block goes
 * back to the pool. Returns 1 when it did. */
static int detach(ds_prefix *pc, int32_t b)
{
	node *n = &pc->nodes[b];
	int32_t *pp = &pc->buckets[n->hash & pc->mask];
	while (*pp != b)
		pp = &pc->nodes[*pp].hnext;
	*pp = n->hnext;
	if (n->prev_sib >= 0)
		pc->nodes[n->prev_sib].next_sib = n->next_sib;
	else if (n->parent >= 0)
		pc->nodes[n->parent].first_child = n->next_sib;
	if (n->next_sib >= 0)
		pc->nodes[n->next_sib].prev_sib = n->prev_sib;
	if (n->parent >= 0) {
		node *p = &pc->nodes[n->parent];
		p->n_children--;
		if (is_evictable_leaf(p))
			heap_push(pc, n->parent);
	}
	heap_remove(pc, b);
	n->in_tree = 0;
	n->parent = n->first_child = n->next_sib = n->prev_sib = n->hnext = -1;
	n->n_children = 0;
	pc->n_nodes--;
	if (!n->cached)
		return 0;
	n->cached = 0;
	pc->n_cached--;
	ds_kv_pool_release(pc->pool, b);
	return 1;
}

/* Detaches b and everything under it, deepest first. */
static int detach_subtree(ds_prefix *pc, int32_t b)
{
	int n = 0, released = 0;
	pc->stack[n++] = b;
	for (int i = 0; i < n; i++)
		for (int32_t c = pc->nodes[pc->stack[i]].first_child; c >= 0; c = pc->nodes[c].next_sib)
			pc->stack[n++] = c;
	while (n > 0)
		released += detach(pc, pc->stack[--n]);
	return released;
}

/* ---- pool hooks ---- */

static int hook_release(void *ctx, int32_t b)
{
	ds_prefix *pc = ctx;
	node *n = &pc->nodes[b];
	if (!n->in_tree)
		return 0;
	n->cached = 1;
	n->tick = ++pc->tick;
	pc->n_cached++;
	if (n->n_children == 0)
		heap_push(pc, b);
	return 1;
}

static void hook_acquire(void *ctx, int32_t b)
{
	ds_prefix *pc = ctx;
	node *n = &pc->nodes[b];
	if (!n->cached)
		return;
	n->cached = 0;
	pc->n_cached--;
	heap_remove(pc, b);
}

static int hook_reclaim(void *ctx, int want)
{
	return ds_prefix_evict(ctx, want);
}

/* ---- API ---- */

static void destroy(ds_prefix *pc);

int ds_prefix_new(ds_kv_pool *p, ds_prefix **out)
{
	if (!p || !out)
		return -EINVAL;
	ds_prefix *pc = calloc(1, sizeof(*pc));
	if (!pc)
		return -ENOMEM;
	pc->pool = p;
	pc->nb = ds_kv_pool_blocks(p);
	pc->bt = ds_kv_pool_block_tokens(p);
	uint32_t nbuck = 16;
	while (nbuck < (uint32_t)pc->nb * 2)
		nbuck *= 2;
	pc->mask = nbuck - 1;
	pc->nodes = malloc(sizeof(node) * (size_t)pc->nb);
	pc->tokens = malloc(sizeof(int32_t) * (size_t)pc->nb * (size_t)pc->bt);
	pc->buckets = malloc(sizeof(int32_t) * nbuck);
	pc->heap = malloc(sizeof(int32_t) * (size_t)pc->nb);
	pc->stack = malloc(sizeof(int32_t) * (size_t)pc->nb);
	if (!pc->nodes || !pc->tokens || !pc->buckets || !pc->heap || !pc->stack) {
		destroy(pc);
		return -ENOMEM;
	}
	for (int i = 0; i < pc->nb; i++)
		pc->nodes[i] = (node){ .parent = -1, .first_child = -1, .next_sib = -1, .prev_sib = -1,
				       .hnext = -1, .heap_pos = -1 };
	memset(pc->buckets, 0xff, sizeof(int32_t) * nbuck);
	ds_kv_pool_hooks h = { .ctx = pc, .on_release = hook_release, .reclaim = hook_reclaim,
			       .on_acquire = hook_acquire };
	ds_kv_pool_set_hooks(p, &h);
	*out = pc;
	return 0;
}

ds_prefix *ds_prefix_free(ds_prefix *pc)
{
	if (!pc)
		return NULL;
	ds_prefix_flush(pc);
	ds_kv_pool_set_hooks(pc->pool, NULL);
	destroy(pc);
	return NULL;
}

static void destroy(ds_prefix *pc)
{
	free(pc->nodes);
	free(pc->tokens);
	free(pc->buckets);
	free(pc->heap);
	free(pc->stack);
	free(pc);
}

int ds_prefix_lookup(ds_prefix *pc, const int32_t *tokens, int n, int32_t *blocks, int max_blocks)
{
	if (!pc || (n > 0 && !tokens) || max_blocks < 0 || (max_blocks > 0 && !blocks))
		return -EINVAL;
	int full = n > 0 ? (n - 1) / pc->bt : 0;
	if (full > max_blocks)
		full = max_blocks;
	int32_t parent = -1;
	int i = 0;
	for (; i < full; i++) {
		const int32_t *t = tokens + (size_t)i * (size_t)pc->bt;
		int32_t c = find_child(pc, parent, t, block_hash(parent, t, pc->bt));
		if (c < 0)
			break;
		blocks[i] = c;
		parent = c;
	}
	return i * pc->bt;
}

int ds_prefix_insert(ds_prefix *pc, const int32_t *tokens, int n, const int32_t *blocks, int n_blocks)
{
	if (!pc || n < 0 || n_blocks < 0 || (n > 0 && !tokens) || (n_blocks > 0 && !blocks))
		return -EINVAL;
	int full = n / pc->bt;
	if (full > n_blocks)
		full = n_blocks;
	int32_t parent = -1;
	int added = 0;
	for (int i = 0; i < full; i++) {
		const int32_t *t = tokens + (size_t)i * (size_t)pc->bt;
		uint32_t h = block_hash(parent, t, pc->bt);
		int32_t c = find_child(pc, parent, t, h);
		if (c >= 0) {
			parent = c;
			continue;
		}
		int32_t b = blocks[i];
		/* A block already elsewhere in the tree, or not held by the caller,
		 * cannot be keyed here: stop rather than guess. */
		if (b < 0 || b >= pc->nb || pc->nodes[b].in_tree || ds_kv_pool_refcount(pc->pool, b) <= 0)
			break;
		node *nd = &pc->nodes[b];
		memcpy(pc->tokens + (size_t)b * (size_t)pc->bt, t, sizeof(int32_t) * (size_t)pc->bt);
		nd->in_tree = 1;
		nd->cached = 0;
		nd->parent = parent;
		nd->hash = h;
		nd->hnext = pc->buckets[h & pc->mask];
		pc->buckets[h & pc->mask] = b;
		nd->first_child = -1;
		nd->n_children = 0;
		nd->prev_sib = -1;
		nd->next_sib = -1;
		if (parent >= 0) {
			node *p = &pc->nodes[parent];
			nd->next_sib = p->first_child;
			if (p->first_child >= 0)
				pc->nodes[p->first_child].prev_sib = b;
			p->first_child = b;
			p->n_children++;
			heap_remove(pc, parent);
		}
		pc->n_nodes++;
		pc->inserted++;
		added++;
		parent = b;
	}
	return added;
}

void ds_prefix_account(ds_prefix *pc, int prompt_tokens, int hit_tokens)
{
	if (!pc || prompt_tokens < 0 || hit_tokens < 0 || hit_tokens > prompt_tokens)
		return;
	pc->prompt_tokens += (uint64_t)prompt_tokens;
	pc->hit_tokens += (uint64_t)hit_tokens;
}

int ds_prefix_evict(ds_prefix *pc, int want)
{
	int released = 0;
	while (released < want) {
		if (pc->heap_n > 0) {
			int32_t b = pc->heap[0];
			released += detach(pc, b);
			continue;
		}
		if (pc->n_cached == 0)
			break;
		/* Every cached block has a referenced descendant (another sequence
		 * computed the same tokens into its own block and cached the blocks
		 * after it). Drop the oldest such subtree: the referenced blocks in
		 * it become private to their sequences. */
		int32_t oldest = -1;
		for (int32_t b = 0; b < pc->nb; b++)
			if (pc->nodes[b].cached && (oldest < 0 || pc->nodes[b].tick < pc->nodes[oldest].tick))
				oldest = b;
		released += detach_subtree(pc, oldest);
	}
	pc->evictions += (uint64_t)released;
	return released;
}

int ds_prefix_flush(ds_prefix *pc)
{
	if (!pc)
		return 0;
	int released = 0;
	for (int32_t b = 0; b < pc->nb; b++)
		if (pc->nodes[b].in_tree && pc->nodes[b].parent < 0)
			released += detach_subtree(pc, b);
	return released;
}

ds_kv_pool *ds_prefix_pool(const ds_prefix *pc)
{
	return pc->pool;
}

int ds_prefix_cached(const ds_prefix *pc)
{
	return pc ? pc->n_cached : 0;
}

void ds_prefix_stats_get(const ds_prefix *pc, ds_prefix_stats *st)
{
	memset(st, 0, sizeof(*st));
	if (!pc)
		return;
	st->prompt_tokens = pc->prompt_tokens;
	st->hit_tokens = pc->hit_tokens;
	st->evictions = pc->evictions;
	st->inserted = pc->inserted;
	st->blocks_total = pc->nb;
	st->blocks_free = ds_kv_pool_free_count(pc->pool);
	st->blocks_cached = pc->n_cached;
	st->blocks_used = pc->nb - st->blocks_free - pc->n_cached;
	st->nodes = pc->n_nodes;
}

int ds_prefix_check(const ds_prefix *pc)
{
	int used = 0, cached = 0, nodes = 0, leaves = 0;
	for (int32_t b = 0; b < pc->nb; b++) {
		const node *n = &pc->nodes[b];
		int refs = ds_kv_pool_refcount(pc->pool, b);
		used += refs > 0;
		if (!n->in_tree) {
			if (n->cached || n->heap_pos >= 0 || n->n_children)
				return -EFAULT;
			continue;
		}
		nodes++;
		if (n->cached != (refs == 0))
			return -EFAULT;
		cached += n->cached;
		int kids = 0;
		for (int32_t c = n->first_child; c >= 0; c = pc->nodes[c].next_sib) {
			if (!pc->nodes[c].in_tree || pc->nodes[c].parent != b)
				return -EFAULT;
			kids++;
		}
		if (kids != n->n_children)
			return -EFAULT;
		if (n->parent >= 0 && !pc->nodes[n->parent].in_tree)
			return -EFAULT;
		if (find_child(pc, n->parent, pc->tokens + (size_t)b * (size_t)pc->bt, n->hash) != b)
			return -EFAULT;
		if (is_evictable_leaf(n) != (n->heap_pos >= 0))
			return -EFAULT;
		if (n->heap_pos >= 0) {
			leaves++;
			if (n->heap_pos >= pc->heap_n || pc->heap[n->heap_pos] != b)
				return -EFAULT;
			if (n->heap_pos > 0 && heap_less(pc, b, pc->heap[(n->heap_pos - 1) / 2]))
				return -EFAULT;
		}
	}
	if (cached != pc->n_cached || nodes != pc->n_nodes || leaves != pc->heap_n)
		return -EFAULT;
	if (used + cached + ds_kv_pool_free_count(pc->pool) != pc->nb)
		return -EFAULT;
	return 0;
}

/* graph.c — the step-graph cache (see graph.h). A small array searched
 * linearly: a server meets a few dozen decode shapes, and the search costs
 * nothing next to a step. */
#include <cuda_runtime_api.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/graph.h"

enum { NEW, SEEN, GRAPH, EAGER_ONLY };

typedef struct {
	int used, state;
	int key[DSK_GRAPH_KEY];
	unsigned long long last;
	cudaGraphExec_t exec;
} entry;

struct dsk_graphs {
	entry *v;
	int cap;
	unsigned long long clock;
	dsk_graph_stats st;
};

int dsk_graphs_new(int cap, dsk_graphs **out)
{
	dsk_graphs *g = calloc(1, sizeof(*g));
	if (!g || cap < 1 || !(g->v = calloc((size_t)cap, sizeof(entry)))) {
		free(g);
		return cap < 1 ? -EINVAL : -ENOMEM;
	}
	g->cap = cap;
	*out = g;
	return 0;
}

static void drop(entry *x)
{
	if (x->exec)
		cudaGraphExecDestroy(x->exec);
	memset(x, 0, sizeof(*x));
}

void dsk_graphs_clear(dsk_graphs *g)
{
	if (!g)
		return;
	for (int i = 0; i < g->cap; i++)
		drop(&g->v[i]);
}

void dsk_graphs_free(dsk_graphs *g)
{
	if (!g)
		return;
	dsk_graphs_clear(g);
	free(g->v);
	free(g);
}

dsk_graph_stats dsk_graphs_stats(const dsk_graphs *g) { return g->st; }

/* The key's entry, or a fresh one in place of a free or the least recently
 * used slot. */
static entry *find(dsk_graphs *g, const int key[DSK_GRAPH_KEY])
{
	entry *victim = &g->v[0];
	for (int i = 0; i < g->cap; i++) {
		entry *x = &g->v[i];
		if (x->used && !memcmp(x->key, key, sizeof(x->key)))
			return x;
		if (victim->used && (!x->used || x->last < victim->last))
			victim = x;
	}
	drop(victim);
	victim->used = 1;
	victim->state = NEW;
	memcpy(victim->key, key, sizeof(victim->key));
	return victim;
}

static int capture(dsk_graphs *g, entry *x, dsk_stream s, dsk_graph_body body, void *ctx, ds_err *e)
{
	cudaGraph_t graph = NULL;
	if (cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
		cudaGetLastError();
		return -EIO;
	}
	int rc = body(ctx, e);
	cudaError_t err = cudaStreamEndCapture(s, &graph);
	if (!rc && err == cudaSuccess && graph)
		err = cudaGraphInstantiate(&x->exec, graph, 0);
	if (graph)
		cudaGraphDestroy(graph);
	if (rc || err != cudaSuccess || !x->exec) {
		cudaGetLastError();
		x->exec = NULL;
		return rc ? rc : -EIO;
	}
	g->st.captures++;
	return 0;
}

int dsk_graphs_run(dsk_graphs *g, const int key[DSK_GRAPH_KEY], dsk_stream s, dsk_graph_body body, void *ctx,
		   ds_err *e)
{
	entry *x = find(g, key);
	x->last = ++g->clock;
	if (x->state == NEW) {
		x->state = SEEN;
		g->st.eager++;
		return body(ctx, e);
	}
	if (x->state == SEEN) {
		if (capture(g, x, s, body, ctx, e)) {
			/* Not capturable (or the body failed): eager from now on,
			 * and this step runs again outside a capture. */
			x->state = EAGER_ONLY;
			g->st.failed++;
			if (e)
				e->msg[0] = 0;
			g->st.eager++;
			return body(ctx, e);
		}
		x->state = GRAPH;
	}
	if (x->state == EAGER_ONLY) {
		g->st.eager++;
		return body(ctx, e);
	}
	cudaError_t err = cudaGraphLaunch(x->exec, s);
	if (err != cudaSuccess) {
		cudaGetLastError();
		return ds_errf(e, -EIO, "cuda graph launch: %s", cudaGetErrorString(err));
	}
	g->st.replays++;
	return 0;
}

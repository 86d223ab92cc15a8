/* graph.h — CUDA graphs of step bodies, cached by the step's shape.
 * A decode step is hundreds of small launches; replaying a captured graph
 * costs one. The caller names a shape by a key (all that the body's launch
 * parameters depend on) and passes the body: a key seen for the first time
 * runs eagerly (it warms cuBLASLt's heuristics and sizes lazily grown
 * buffers), the second time it is captured and replayed from then on. A body
 * that cannot be captured runs eagerly for that key from then on. Graphs hold
 * device pointers: after any buffer they may use is reallocated the caller
 * must call dsk_graphs_clear. One thread drives a cache. */
#ifndef DSK_GRAPH_H
#define DSK_GRAPH_H

#include "kernels/dsk.h"

enum { DSK_GRAPH_KEY = 6 };

typedef struct dsk_graphs dsk_graphs;
typedef int (*dsk_graph_body)(void *ctx, ds_err *e);

typedef struct dsk_graph_stats {
	long replays, captures, eager, failed; /* failed: captures that did not work */
} dsk_graph_stats;

/* cap: graphs kept (least recently used ones go). */
int dsk_graphs_new(int cap, dsk_graphs **out);
void dsk_graphs_free(dsk_graphs *g);
void dsk_graphs_clear(dsk_graphs *g);
/* Runs body(ctx) on stream s, through the graph of key where there is one.
 * Returns the body's result (or a CUDA error). */
int dsk_graphs_run(dsk_graphs *g, const int key[DSK_GRAPH_KEY], dsk_stream s, dsk_graph_body body, void *ctx,
		   ds_err *e);
dsk_graph_stats dsk_graphs_stats(const dsk_graphs *g);

#endif

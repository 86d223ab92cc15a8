/* backend.h — the contract between the engine and a compute backend.
 * The engine owns sequences, block tables and sampling; a backend owns the
 * resident weights, the KV pool's memory and the math of one forward step.
 * The CPU backend (model/cpu_*.c) is the reference; kernels/ implements the
 * same table in CUDA. A backend is driven by one thread at a time. */
#ifndef DS_BACKEND_H
#define DS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "model/err.h"
#include "model/model.h"
#include "model/wload.h"

typedef struct ds_backend ds_backend;

typedef struct ds_backend_config {
	int threads;        /* CPU threads; 0 = all cores */
	int kv_blocks;      /* blocks in the KV pool; 0 = the backend sizes it and writes the count back */
	int block_tokens;   /* tokens per block */
	int device;         /* GPU ordinal */
	double gpu_kv_fraction; /* of free memory after weights, when kv_blocks == 0 */
	size_t kv_bytes;    /* GPU: the pool's size in bytes instead of the fraction (0 = unset) */
	int uring_load;     /* GPU: stream the weights with io_uring (model/wload.h), else upload from the mapping */
	int eager;          /* GPU: no CUDA graphs for decode steps */
	ds_wload_progress *load_progress; /* optional, updated while streaming */
	ds_wload_result load_result;      /* out: what streaming did (zero when it did not run) */
} ds_backend_config;

/* One forward step over a batch of sequences. Sequence i contributes n_new[i]
 * new tokens at positions pos0[i] .. pos0[i]+n_new[i]-1; its KV for positions
 * < pos0[i] is already in the pool at the slots its block table names, and
 * this step writes the new positions' KV there. Token j of sequence i is
 * tokens[off_i + j] with off_i = sum of n_new before i.
 * Logits: rows are written for each sequence's new tokens from index
 * logits_from[i] (n_new[i] = none) to the end, in sequence order.
 * mtp > 0 runs MTP layer mtp-1 instead of the main model: token j is then
 * the token after position pos0+j and hidden_in[off_i + j] is the main
 * model's final-normed hidden state at that position. */
typedef struct ds_batch {
	int n_seqs;
	const int *n_new;
	const int *pos0;
	const int32_t *tokens;
	const int32_t *const *block_tables; /* per sequence */
	const int *logits_from;
	int mtp;
	const float *hidden_in;            /* [sum n_new][hidden], mtp only */
	/* Main-model steps on a backend with `chain` set: MTP layer 0 runs
	 * right after the main model over the first n_chain sequences' new
	 * positions, in the same call and without the host in between. Each of
	 * them has logits_from 0 and argmax rows (no draw): the MTP token at
	 * its position j is the argmax of its main row j, the hidden input its
	 * final-normed hidden state there. Their rows come first, so the MTP's
	 * rows are rows 0 .. sum of their n_new - 1. */
	int n_chain;
	/* With n_chain: 1 + the chained MTP passes of one position each that
	 * follow (model/engine.h, ds_engine_step_chain's depth; kernels/chain.h);
	 * their KV positions lie up to chain_depth - 1 past each chained
	 * sequence's new positions, in blocks its table already holds. 0 = 1. */
	int chain_depth;
} ds_batch;

/* How far MTP KV may run past the main KV: chained drafts (the MTP module
 * on its own output) of depth up to DS_MTP_MAX_AHEAD + 1. */
#define DS_MTP_MAX_AHEAD 3

/* A token drawn by the backend from one logit row (see kernels/sample.h
 * for the exact rule): softmax(l / temperature) filtered by top-k, top-p and
 * min-p, then the first token whose cumulative mass in id order exceeds u.
 * temperature 0: the argmax. */
typedef struct ds_draw {
	float temperature, top_p, min_p, u;
	int top_k, pad_;
} ds_draw;

typedef struct ds_step_out {
	float *logits;     /* [rows][vocab], rows as described above */
	/* Optional: [sum n_new][hidden]. Main model: hidden state after the
	 * final norm (the MTP input). MTP: its output before shared_head.norm
	 * (the input of a chained MTP step). */
	float *hidden;
	/* Optional: [rows] the argmax of each logit row (first maximal index). */
	int32_t *argmax;
	/* Optional: [rows], 0 where the caller takes only the argmax: that
	 * logits row may be left unwritten (a GPU does not download it). */
	const uint8_t *need;
	/* Optional, for backends with `draws` set: [rows]; argmax[r] is then
	 * the token drawn with draw[r], and a row drawn with temperature > 0
	 * is not written to logits. */
	const ds_draw *draw;
	/* With n_chain: [rows of the chained sequences], the argmax of each
	 * of their MTP logit rows, then [chain_depth - 1][n_chain] those of
	 * the deeper passes. */
	int32_t *mtp_argmax;
} ds_step_out;

typedef struct ds_backend_ops {
	const char *name;
	int (*create)(const ds_model *m, ds_backend_config *cfg, ds_backend **out, ds_err *e);
	void (*destroy)(ds_backend *b);
	int (*forward)(ds_backend *b, const ds_batch *batch, ds_step_out *out, ds_err *e);
	/* Optional (NULL = unsupported): copy one KV block (copy-on-write). */
	int (*kv_copy)(ds_backend *b, int32_t dst, int32_t src);
	/* Optional: memory report. */
	size_t (*weight_bytes)(const ds_backend *b);
	/* Optional: tokens routed to each expert since create, [layer][expert]
	 * over the main and MTP layers (zeros for dense layers). Between steps. */
	int (*expert_load)(ds_backend *b, uint64_t *out);
	/* forward takes ds_step_out.draw (sampling on the device). */
	int draws;
	/* forward takes ds_batch.n_chain; without it the engine runs the MTP
	 * step itself (model/engine.h, ds_engine_step_chain). */
	int chain;
} ds_backend_ops;

/* Bytes of one KV block across all layers (main + MTP) in float32. */
size_t ds_kv_block_bytes(const ds_model *m, int block_tokens);

extern const ds_backend_ops ds_cpu_backend;
/* kernels/ defines ds_cuda_backend when built with CUDA. */
/* "cpu", "cuda"; NULL when unknown or not built. */
const ds_backend_ops *ds_backend_find(const char *name);

#endif

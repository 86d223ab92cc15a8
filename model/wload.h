/* wload.h — streams a model's tensors from its safetensors shards with io_uring
 * (O_DIRECT aligned reads into registered staging buffers) and hands each
 * tensor's bytes, in their stored dtype, to a sink (host memory, or pinned
 * staging + cudaMemcpyAsync for the GPU). ds_wload_run runs on the caller's
 * thread; a ds_wload_progress may be read from any thread meanwhile. */
#ifndef DS_WLOAD_H
#define DS_WLOAD_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "model/err.h"
#include "model/weights.h"

/* Where the bytes go. Every callback returns 0 or a negative errno; a failure
 * stops the load and is returned by ds_wload_run (the message in the ds_err
 * then names the tensor). All callbacks run on ds_wload_run's thread.
 *
 * Order: alloc_staging for each staging buffer; then per tensor tensor_begin
 * once, before any chunk of it; chunk calls for disjoint pieces of the tensor
 * (any order, possibly interleaved with other tensors and shards); tensor_end
 * once all nbytes were handed over. Before a staging buffer is filled again
 * (and before it is freed) buffer_wait(buf) is called, so chunk may copy
 * asynchronously out of the staging buffer and finish the copy there.
 * On error no further chunk is delivered, buffer_wait is called for every
 * buffer that was used, then free_staging; the destinations handed out by
 * tensor_begin are the sink's to free (nothing of a failed load is valid). */
typedef struct ds_wload_sink {
	void *ctx;
	/* Optional (NULL: posix_memalign, free). A buffer must be ordinary
	 * anonymous memory, aligned to 4096: O_DIRECT and io_uring buffer
	 * registration pin its pages themselves. For CUDA use posix_memalign +
	 * cudaHostRegister, not cudaHostAlloc (driver-mapped pages can be
	 * neither registered nor used for O_DIRECT). */
	int (*alloc_staging)(void *ctx, size_t bytes, int buf, void **out);
	void (*free_staging)(void *ctx, void *p, int buf);
	/* Required: where tensor t's nbytes go (*dst is opaque to the loader and
	 * passed back to chunk/tensor_end; may be NULL for nbytes == 0). */
	int (*tensor_begin)(void *ctx, const ds_tensor_ref *t, void **dst);
	/* Required: bytes [off, off+len) of tensor t are at src, inside staging
	 * buffer buf, valid until buffer_wait(buf) returns. */
	int (*chunk)(void *ctx, const ds_tensor_ref *t, void *dst, size_t off, const void *src, size_t len,
		     int buf);
	/* Optional: every byte of t was handed over. */
	int (*tensor_end)(void *ctx, const ds_tensor_ref *t, void *dst);
	/* Optional: block until no copy out of staging buffer buf is pending. */
	int (*buffer_wait)(void *ctx, int buf);
} ds_wload_sink;

enum {
	DS_WLOAD_BUFFERED = 1u << 0,  /* do not try O_DIRECT */
	DS_WLOAD_NO_REGISTER = 1u << 1, /* do not register the staging buffers */
	DS_WLOAD_NO_URING = 1u << 2,  /* synchronous pread instead of io_uring */
};

/* Called with each read completion's result before the loader looks at it;
 * returns the result to use. Lets tests inject short reads, EIO, EOF. */
typedef int (*ds_wload_fault_fn)(void *ctx, int shard, uint64_t file_offset, unsigned len, int res);

typedef struct ds_wload_opts {
	unsigned flags;        /* DS_WLOAD_* */
	size_t buf_bytes;      /* staging buffer size, multiple of 4096; 0: 4 MiB */
	int n_bufs;            /* staging buffers = reads in flight; 0: 16 */
	int shards_in_flight;  /* shards read concurrently; 0: 2 */
	ds_wload_fault_fn fault; /* tests only; NULL otherwise */
	void *fault_ctx;
} ds_wload_opts;

/* Written by the loading thread, read by any other (relaxed atomics: the
 * numbers are for display). rate = done / elapsed. */
typedef struct ds_wload_progress {
	_Atomic uint64_t done;      /* tensor bytes delivered */
	_Atomic uint64_t total;     /* tensor bytes to deliver; set before the first read */
	_Atomic uint64_t start_ns;  /* CLOCK_MONOTONIC when reading started, 0 before */
	_Atomic uint64_t end_ns;    /* when it finished or failed, 0 while running */
} ds_wload_progress;

typedef struct ds_wload_snapshot {
	uint64_t done, total;
	double seconds;        /* elapsed so far */
	double bytes_per_s;
	int finished;
} ds_wload_snapshot;

void ds_wload_progress_read(const ds_wload_progress *p, ds_wload_snapshot *out);

typedef struct ds_wload_result {
	uint64_t tensor_bytes;   /* delivered */
	uint64_t read_bytes;     /* read from disk (alignment padding and gaps included) */
	double seconds;
	int tensors;
	int shards;
	int buffered_shards;     /* shards read without O_DIRECT (forced or refused) */
	int direct_refused;      /* 1 when O_DIRECT was asked for and refused somewhere */
	int io_uring;            /* 0: io_uring was unavailable (seccomp, sysctl), pread used */
	int registered;          /* 1 when the staging buffers were registered */
	int retries;             /* short reads / EAGAIN resubmitted */
} ds_wload_result;

/* Loads the tensors refs[0..n) of w (refs == NULL: every tensor of w) into
 * sink. w may be opened with DS_WEIGHTS_NO_MAP. Every shard touched is checked
 * against the header w read (size and header bytes) and re-checked after its
 * last read (size, mtime, still the file at its path). opts and progress and
 * result may be NULL. Returns 0, or a negative errno with e naming the file. */
int ds_wload_run(const ds_weights *w, const ds_tensor_ref *const *refs, size_t n, const ds_wload_sink *sink,
		 const ds_wload_opts *opts, ds_wload_progress *progress, ds_wload_result *result, ds_err *e);

/* A host-memory sink: each tensor into its own malloc'ed buffer, found by the
 * ref's index in w (ds_weights_at order). Free with ds_wload_host_free. */
typedef struct ds_wload_host {
	const ds_weights *w;
	void **data;           /* [ds_weights_count(w)]; NULL for tensors not loaded */
	size_t n;
} ds_wload_host;

int ds_wload_host_init(ds_wload_host *h, const ds_weights *w);
void ds_wload_host_sink(ds_wload_host *h, ds_wload_sink *out);
void ds_wload_host_free(ds_wload_host *h);

#endif

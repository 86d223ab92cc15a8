/* bench_load — weight loading rate from disk to GPU memory (issue 8).
 *   bench_load gen DIR LAYERS [SHARD_GIB]   random bf16 safetensors shards of the
 *        DeepSeek-V2-Lite layout (27 layers = the whole model, ~31 GB)
 *   bench_load run DIR METHOD [--buf MiB] [--bufs N] [--sif N] [--streams N] [--verify]
 *        METHOD: uring (ds_wload + CUDA sink), host (ds_wload into malloc'ed memory), read (pread + cudaMemcpy per
 *        tensor), mmap (cudaMemcpy from the mapping per tensor)
 * Prints one line: method, bytes, seconds, GB/s (1e9). The timed region is
 * opening the model (headers) and every tensor landing in a device arena that
 * was allocated beforehand. The page cache is the caller's to drop. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include "model/weights.h"
#include "model/wload.h"
#include "model/wload_cuda.h"

#define CK(x)                                                                                   \
	do {                                                                                    \
		cudaError_t ce_ = (x);                                                          \
		if (ce_ != cudaSuccess) {                                                       \
			fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x,              \
				cudaGetErrorString(ce_));                                       \
			exit(1);                                                                \
		}                                                                               \
	} while (0)

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- gen ---- */

typedef struct gt {
	char name[96];
	int64_t r, c; /* c == 0: 1-D */
	size_t bytes, off;
	int shard;
} gt;

static gt *G;
static size_t NG, CAPG;

static void add(const char *name, int64_t r, int64_t c)
{
	if (NG == CAPG) {
		CAPG = CAPG ? CAPG * 2 : 1024;
		G = realloc(G, CAPG * sizeof(gt));
	}
	gt *t = &G[NG++];
	memset(t, 0, sizeof(*t));
	snprintf(t->name, sizeof(t->name), "%s", name);
	t->r = r;
	t->c = c;
	t->bytes = (size_t)r * (size_t)(c ? c : 1) * 2;
}

/* DeepSeek-V2-Lite: hidden 2048, 16 heads (qk 128+64, v 128), kv_lora 512,
 * no q_lora, layer 0 dense (10944), then 64 routed experts (1408) + 2 shared. */
static void v2lite_layout(int layers)
{
	char n[96];
	add("model.embed_tokens.weight", 102400, 2048);
	for (int l = 0; l < layers; l++) {
#define P(fmt, ...) (snprintf(n, sizeof(n), "model.layers.%d." fmt, l, ##__VA_ARGS__), n)
		add(P("input_layernorm.weight"), 2048, 0);
		add(P("self_attn.q_proj.weight"), 16 * 192, 2048);
		add(P("self_attn.kv_a_proj_with_mqa.weight"), 512 + 64, 2048);
		add(P("self_attn.kv_a_layernorm.weight"), 512, 0);
		add(P("self_attn.kv_b_proj.weight"), 16 * 256, 512);
		add(P("self_attn.o_proj.weight"), 2048, 16 * 128);
		add(P("post_attention_layernorm.weight"), 2048, 0);
		if (l == 0) {
			add(P("mlp.gate_proj.weight"), 10944, 2048);
			add(P("mlp.up_proj.weight"), 10944, 2048);
			add(P("mlp.down_proj.weight"), 2048, 10944);
			continue;
		}
		add(P("mlp.gate.weight"), 64, 2048);
		for (int e = 0; e < 64; e++) {
			add(P("mlp.experts.%d.gate_proj.weight", e), 1408, 2048);
			add(P("mlp.experts.%d.up_proj.weight", e), 1408, 2048);
			add(P("mlp.experts.%d.down_proj.weight", e), 2048, 1408);
		}
		add(P("mlp.shared_experts.gate_proj.weight"), 2816, 2048);
		add(P("mlp.shared_experts.up_proj.weight"), 2816, 2048);
		add(P("mlp.shared_experts.down_proj.weight"), 2048, 2816);
#undef P
	}
	add("model.norm.weight", 2048, 0);
	add("lm_head.weight", 102400, 2048);
}

typedef struct gjob {
	const char *dir;
	int shard, nshards;
	int rc;
} gjob;

static void *gen_shard(void *arg)
{
	gjob *j = arg;
	size_t cap = 1 << 20, hl = 0;
	char *h = malloc(cap);
	hl += (size_t)snprintf(h, cap, "{\"__metadata__\":{\"format\":\"pt\"}");
	for (size_t i = 0; i < NG; i++) {
		if (G[i].shard != j->shard)
			continue;
		char shape[64];
		if (G[i].c)
			snprintf(shape, sizeof(shape), "[%lld,%lld]", (long long)G[i].r, (long long)G[i].c);
		else
			snprintf(shape, sizeof(shape), "[%lld]", (long long)G[i].r);
		hl += (size_t)snprintf(h + hl, cap - hl, ",\"%s\":{\"dtype\":\"BF16\",\"shape\":%s,\"data_offsets\":[%zu,%zu]}",
				       G[i].name, shape, G[i].off, G[i].off + G[i].bytes);
	}
	hl += (size_t)snprintf(h + hl, cap - hl, "}");
	while (hl % 8) /* as the safetensors writer does */
		h[hl++] = ' ';
	char path[1024];
	snprintf(path, sizeof(path), "%s/model-%05d-of-%05d.safetensors", j->dir, j->shard + 1, j->nshards);
	FILE *f = fopen(path, "wb");
	if (!f) {
		j->rc = -errno;
		free(h);
		return NULL;
	}
	uint64_t hl64 = hl;
	fwrite(&hl64, 8, 1, f);
	fwrite(h, 1, hl, f);
	free(h);
	size_t bsz = 64u << 20;
	uint64_t *buf = malloc(bsz), s = 0x9e3779b97f4a7c15ull * (uint64_t)(j->shard + 1);
	for (size_t i = 0; i < NG; i++) {
		if (G[i].shard != j->shard)
			continue;
		for (size_t left = G[i].bytes; left;) {
			size_t n = left < bsz ? left : bsz;
			for (size_t k = 0; k < (n + 7) / 8; k++) {
				s ^= s << 13;
				s ^= s >> 7;
				s ^= s << 17;
				buf[k] = s;
			}
			if (fwrite(buf, 1, n, f) != n) {
				j->rc = -EIO;
				break;
			}
			left -= n;
		}
	}
	free(buf);
	if (fclose(f) != 0)
		j->rc = -EIO;
	return NULL;
}

static int cmd_gen(const char *dir, int layers, double shard_gib)
{
	v2lite_layout(layers);
	size_t target = (size_t)(shard_gib * (1ull << 30)), acc = 0, total = 0;
	int shard = 0;
	for (size_t i = 0; i < NG; i++) {
		if (acc && acc + G[i].bytes > target) {
			shard++;
			acc = 0;
		}
		G[i].shard = shard;
		G[i].off = acc;
		acc += G[i].bytes;
		total += G[i].bytes;
	}
	int nshards = shard + 1;
	mkdir(dir, 0755);
	char path[1024];
	snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
	FILE *f = fopen(path, "w");
	if (!f) {
		perror(path);
		return 1;
	}
	fprintf(f, "{\"metadata\":{\"total_size\":%zu},\"weight_map\":{", total);
	for (size_t i = 0; i < NG; i++)
		fprintf(f, "%s\"%s\":\"model-%05d-of-%05d.safetensors\"", i ? "," : "", G[i].name, G[i].shard + 1,
			nshards);
	fprintf(f, "}}\n");
	fclose(f);
	pthread_t th[256];
	gjob jobs[256];
	if (nshards > 256)
		return 1;
	double t0 = now_s();
	for (int s = 0; s < nshards; s++) {
		jobs[s] = (gjob){ dir, s, nshards, 0 };
		pthread_create(&th[s], NULL, gen_shard, &jobs[s]);
	}
	int rc = 0;
	for (int s = 0; s < nshards; s++) {
		pthread_join(th[s], NULL);
		rc |= jobs[s].rc;
	}
	printf("gen: %zu tensors, %.2f GB in %d shards, %.1f s\n", NG, total / 1e9, nshards, now_s() - t0);
	return rc ? 1 : 0;
}

/* ---- run ---- */

static int by_offset(const void *a, const void *b)
{
	const ds_tensor_ref *x = *(const ds_tensor_ref *const *)a, *y = *(const ds_tensor_ref *const *)b;
	if (x->shard != y->shard)
		return x->shard - y->shard;
	return x->file_offset < y->file_offset ? -1 : x->file_offset > y->file_offset;
}

/* Tensors in file order, as a simple loader walks them. */
static const ds_tensor_ref **file_order(const ds_weights *w)
{
	size_t n = ds_weights_count(w);
	const ds_tensor_ref **v = malloc(n * sizeof(*v));
	for (size_t i = 0; i < n; i++)
		v[i] = ds_weights_at(w, i);
	qsort(v, n, sizeof(*v), by_offset);
	return v;
}

/* Sampled tensors copied back from the GPU equal the file's bytes. */
static int verify(const ds_weights *w, ds_wload_cuda *c)
{
	size_t n = ds_weights_count(w), step = n / 97 + 1, checked = 0;
	for (size_t i = 0; i < n; i += step) {
		const ds_tensor_ref *t = ds_weights_at(w, i);
		uint8_t *a = malloc(t->nbytes + 1), *b = malloc(t->nbytes + 1);
		CK(cudaMemcpy(a, ds_wload_cuda_ptr(c, i), t->nbytes, cudaMemcpyDeviceToHost));
		int fd = open(ds_weights_shard_path(w, t->shard), O_RDONLY);
		ssize_t r = pread(fd, b, t->nbytes, (off_t)t->file_offset);
		close(fd);
		if (r != (ssize_t)t->nbytes || memcmp(a, b, t->nbytes)) {
			fprintf(stderr, "verify: tensor %s differs\n", t->name);
			return 1;
		}
		free(a);
		free(b);
		checked++;
	}
	printf("verify: %zu sampled tensors byte-identical on the GPU\n", checked);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 4 && !strcmp(argv[1], "gen"))
		return cmd_gen(argv[2], atoi(argv[3]), argc > 4 ? atof(argv[4]) : 4.0);
	if (argc < 4 || strcmp(argv[1], "run")) {
		fprintf(stderr, "usage: bench_load gen DIR LAYERS [SHARD_GIB] | run DIR uring|host|read|mmap [--buf MiB] "
				"[--bufs N] [--sif N] [--streams N] [--verify]\n");
		return 2;
	}
	const char *dir = argv[2], *method = argv[3];
	ds_wload_opts o = { 0 };
	int streams = 2, do_verify = 0;
	for (int i = 4; i < argc; i++) {
		if (!strcmp(argv[i], "--buf") && i + 1 < argc)
			o.buf_bytes = (size_t)atoi(argv[++i]) << 20;
		else if (!strcmp(argv[i], "--bufs") && i + 1 < argc)
			o.n_bufs = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--sif") && i + 1 < argc)
			o.shards_in_flight = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--streams") && i + 1 < argc)
			streams = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--verify"))
			do_verify = 1;
		else if (!strcmp(argv[i], "--buffered"))
			o.flags |= DS_WLOAD_BUFFERED;
	}
	/* The arena is sized from a header-only open, outside the timed region,
	 * as is the CUDA context. */
	ds_err e = { { 0 } };
	ds_weights *w0 = NULL;
	if (ds_weights_open(dir, DS_WEIGHTS_NO_MAP, &w0, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		return 1;
	}
	size_t arena_bytes = ds_wload_cuda_arena_bytes(w0, NULL, 0);
	ds_weights_free(w0);
	void *arena = NULL;
	int is_host = !strcmp(method, "host");
	if (!is_host) {
		CK(cudaSetDevice(0));
		CK(cudaMalloc(&arena, arena_bytes));
		CK(cudaMemset(arena, 0, arena_bytes));
		CK(cudaDeviceSynchronize());
	}

	double t0 = now_s();
	ds_weights *w = NULL;
	int is_mmap = !strcmp(method, "mmap");
	if (ds_weights_open(dir, is_mmap ? 0 : DS_WEIGHTS_NO_MAP, &w, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		return 1;
	}
	size_t total = 0, n = ds_weights_count(w);
	for (size_t i = 0; i < n; i++)
		total += ds_weights_at(w, i)->nbytes;
	char extra[200] = "";
	int rc = 0;
	if (is_host) {
		/* The loader alone, into malloc'ed host memory. */
		ds_wload_host h;
		ds_wload_sink sink;
		ds_wload_result r;
		if (ds_wload_host_init(&h, w))
			return 1;
		ds_wload_host_sink(&h, &sink);
		if (ds_wload_run(w, NULL, 0, &sink, &o, NULL, &r, &e)) {
			fprintf(stderr, "host: %s\n", e.msg);
			return 1;
		}
		double t1 = now_s();
		printf("method=host bytes=%zu seconds=%.3f GBps=%.3f direct=%d registered=%d\n", total, t1 - t0,
		       total / (t1 - t0) / 1e9, r.buffered_shards == 0, r.registered);
		ds_wload_host_free(&h);
	} else if (!strcmp(method, "uring")) {
		ds_wload_cuda *c = NULL;
		if (ds_wload_cuda_new(w, arena, arena_bytes, streams, &c))
			return 1;
		ds_wload_sink sink;
		ds_wload_cuda_sink(c, &sink);
		ds_wload_result r;
		rc = ds_wload_run(w, NULL, 0, &sink, &o, NULL, &r, &e);
		if (rc == 0)
			rc = ds_wload_cuda_sync(c);
		if (rc) {
			fprintf(stderr, "uring: %s %s\n", e.msg, ds_wload_cuda_error(c));
			return 1;
		}
		double t1 = now_s();
		snprintf(extra, sizeof(extra), "direct=%d registered=%d io_uring=%d retries=%d buf_mib=%zu bufs=%d sif=%d",
			 r.buffered_shards == 0, r.registered, r.io_uring, r.retries,
			 (o.buf_bytes ? o.buf_bytes : 4u << 20) >> 20, o.n_bufs ? o.n_bufs : 16,
			 o.shards_in_flight ? o.shards_in_flight : 2);
		printf("method=uring bytes=%zu seconds=%.3f GBps=%.3f %s\n", total, t1 - t0, total / (t1 - t0) / 1e9,
		       extra);
		if (do_verify)
			rc = verify(w, c);
		ds_wload_cuda_free(c);
	} else {
		const ds_tensor_ref **v = file_order(w);
		size_t maxb = 0, at = 0;
		for (size_t i = 0; i < n; i++)
			maxb = v[i]->nbytes > maxb ? v[i]->nbytes : maxb;
		uint8_t *host = is_mmap ? NULL : malloc(maxb ? maxb : 1);
		int fd = -1, fd_shard = -1;
		for (size_t i = 0; i < n; i++) {
			const ds_tensor_ref *t = v[i];
			const void *src = t->data;
			if (!is_mmap) {
				if (t->shard != fd_shard) {
					if (fd >= 0)
						close(fd);
					fd = open(ds_weights_shard_path(w, t->shard), O_RDONLY);
					fd_shard = t->shard;
				}
				for (size_t got = 0; got < t->nbytes;) {
					ssize_t r = pread(fd, host + got, t->nbytes - got, (off_t)(t->file_offset + got));
					if (r <= 0) {
						perror("pread");
						return 1;
					}
					got += (size_t)r;
				}
				src = host;
			}
			CK(cudaMemcpy((uint8_t *)arena + at, src, t->nbytes, cudaMemcpyHostToDevice));
			at += (t->nbytes + 255) & ~(size_t)255;
		}
		CK(cudaDeviceSynchronize());
		double t1 = now_s();
		printf("method=%s bytes=%zu seconds=%.3f GBps=%.3f\n", method, total, t1 - t0, total / (t1 - t0) / 1e9);
		if (fd >= 0)
			close(fd);
		free(host);
		free(v);
	}
	ds_weights_free(w);
	if (arena)
		cudaFree(arena);
	return rc;
}

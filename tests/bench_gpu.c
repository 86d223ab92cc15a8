/* bench_gpu — the CUDA backend's decode and prefill speed on one model
 * directory, against the memory roofline measured in the same run.
 * Decode: B sequences of context C each take one token per step (medians of
 * steps; the KV pool is not prefilled: the work per step does not depend on
 * its values). Bytes per step: the weights a step reads (dense ones, plus the
 * routed experts expected to be hit by B tokens under uniform routing) and
 * the KV of B x C positions; over the device-to-device copy bandwidth.
 * Each shape runs four ways in one run: CUDA graphs, eager launches, graphs
 * downloading token ids only, graphs without programmatic dependent launch.
 * Usage: bench_gpu MODEL_DIR [label]   (env DS_BENCH_STEPS, default 10;
 * DS_BENCH_BATCHES, DS_BENCH_CTXS: comma lists instead of 1,8,64,256 and
 * 1024,8192; DS_BENCH_NO_PREFILL=1 skips the prefill, DS_BENCH_PREFILL=P
 * prefills P <= 4096 tokens instead of 4096; DS_BENCH_DEV_MOE=N: steps of
 * up to N tokens on the device-planned experts instead of 1024) */
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/cuda_backend.h"
#include "model/backend.h"
#include "tests/bench_util.h"

/* Bytes read per device-to-device copy byte pair: (read + write) / time. */
static double copy_bandwidth(void)
{
	const size_t n = (size_t)2 << 30;
	void *a, *b;
	if (cudaMalloc(&a, n) != cudaSuccess || cudaMalloc(&b, n) != cudaSuccess)
		return 0;
	cudaMemset(a, 1, n);
	double t[10];
	cudaEvent_t e0, e1;
	cudaEventCreate(&e0);
	cudaEventCreate(&e1);
	for (int i = 0; i < 12; i++) {
		cudaEventRecord(e0, NULL);
		cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
		cudaEventRecord(e1, NULL);
		cudaEventSynchronize(e1);
		float ms;
		cudaEventElapsedTime(&ms, e0, e1);
		if (i >= 2)
			t[i - 2] = ms * 1e-3;
	}
	qsort(t, 10, sizeof(double), cmpd);
	cudaFree(a);
	cudaFree(b);
	return 2.0 * n / ((t[4] + t[5]) / 2);
}

static size_t tref_bytes(const ds_tensor_ref *t) { return t ? t->nbytes : 0; }
static size_t wmat_bytes(const ds_wmat *w)
{
	return w->w ? tref_bytes(w->w) + (w->scale_inv ? tref_bytes(w->scale_inv) : 0) : 0;
}

/* DS_BENCH_NCU=B:C — for `ncu --profile-from-start off`: one decode step of
 * B sequences at context C, launched kernel by kernel, between
 * cudaProfilerStart and Stop (after two warm-up steps); DS_BENCH_NCU=pP: a
 * prefill of one P-token prompt instead. */
static int ncu_step(ds_backend *b, ds_model *m, const char *spec, int bt, int blocks)
{
	int B = 1, C = 1024, P = 0;
	if (spec[0] == 'p' ? sscanf(spec + 1, "%d", &P) != 1 || P < 1 || (P + bt) / bt > blocks
			   : sscanf(spec, "%d:%d", &B, &C) != 2 || B < 1 || C < 1 || (long)B * ((C + bt) / bt) > blocks) {
		fprintf(stderr, "bench_gpu: DS_BENCH_NCU=%s: want B:C or pP that fits the pool\n", spec);
		return 2;
	}
	if (P)
		C = P;
	const int per = (C + bt) / bt, V = m->cfg.vocab_size, NT = P ? P : B;
	int32_t *tab = malloc(sizeof(int32_t) * (size_t)B * per), *tok = malloc(sizeof(int32_t) * NT);
	const int32_t **tabs = malloc(sizeof(int32_t *) * B);
	int *n_new = malloc(sizeof(int) * B), *pos0 = malloc(sizeof(int) * B), *lf = calloc(B, sizeof(int));
	float *logits = malloc(sizeof(float) * (size_t)B * V);
	for (int s = 0; s < B; s++) {
		for (int i = 0; i < per; i++)
			tab[(size_t)s * per + i] = s * per + i;
		tabs[s] = tab + (size_t)s * per;
		n_new[s] = P ? P : 1;
		pos0[s] = P ? 0 : C - 1;
		lf[s] = P ? P - 1 : 0;
	}
	for (int i = 0; i < NT; i++)
		tok[i] = (i * 7919 + 13) % V;
	ds_batch batch = { .n_seqs = B, .n_new = n_new, .pos0 = pos0, .tokens = tok, .block_tables = tabs, .logits_from = lf };
	ds_step_out out = { .logits = logits };
	ds_err e = { { 0 } };
	int rc = ds_cuda_backend_set_graphs(b, 0);
	for (int i = 0; i < 3 && !rc; i++) {
		if (i == 2)
			cudaProfilerStart();
		rc = ds_cuda_backend.forward(b, &batch, &out, &e);
	}
	cudaProfilerStop();
	if (rc)
		fprintf(stderr, "bench_gpu: %s\n", e.msg);
	free(tab);
	free(tok);
	free(tabs);
	free(n_new);
	free(pos0);
	free(lf);
	free(logits);
	ds_cuda_backend.destroy(b);
	ds_model_free(m);
	return rc ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: bench_gpu MODEL_DIR [label]\n");
		return 2;
	}
	int ndev = 0;
	if (cudaGetDeviceCount(&ndev) != cudaSuccess || !ndev) {
		printf("bench_gpu: no GPU\n");
		return 77;
	}
	const int steps = getenv("DS_BENCH_STEPS") ? atoi(getenv("DS_BENCH_STEPS")) : 10;
	const char *label = argc > 2 ? argv[2] : argv[1];
	ds_err e = { { 0 } };
	ds_model *m;
	if (ds_model_open(argv[1], DS_MODEL_NO_MTP, &m, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		return 1;
	}
	const ds_config *c = &m->cfg;
	const int bt = 64, kvd = ds_config_kv_dim(c), L = m->n_layers;
	const double bw = copy_bandwidth();
	double t0 = now();
	/* Under ncu a small pool: kernel replays back up device memory. */
	ds_backend_config bc = { .block_tokens = bt, .kv_blocks = getenv("DS_BENCH_NCU") ? 2048 : 0,
				 .gpu_kv_fraction = 0.8 };
	ds_backend *b;
	if (ds_cuda_backend.create(m, &bc, &b, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		return 1;
	}
	const int blocks = bc.kv_blocks;
	printf("%s: weights %.2f GB on the GPU in %.1f s (%d FP8 weights dequantized); KV pool %d blocks of %d; copy bw %.0f GB/s\n",
	       label, ds_cuda_backend.weight_bytes(b) / 1e9, now() - t0, ds_cuda_backend_fallbacks(b), blocks, bt, bw / 1e9);

	/* Weight bytes a token touches: everything but the routed experts, and
	 * one expert's three matrices. */
	size_t dense = tref_bytes(m->embed) / c->vocab_size * 0 + wmat_bytes(&m->lm_head), expert = 0;
	double active_params = (double)c->vocab_size * c->hidden_size;
	int n_moe = 0;
	for (int i = 0; i < L; i++) {
		const ds_layer_w *w = &m->layers[i];
		const ds_wmat *mats[] = { &w->q_proj, &w->q_a_proj, &w->q_b_proj, &w->kv_a_proj, &w->kv_b_proj, &w->o_proj,
					  &w->gate_proj, &w->up_proj, &w->down_proj, &w->router, &w->sh_gate, &w->sh_up,
					  &w->sh_down };
		for (size_t k = 0; k < sizeof(mats) / sizeof(mats[0]); k++) {
			dense += wmat_bytes(mats[k]);
			if (mats[k]->w)
				active_params += (double)mats[k]->rows * mats[k]->cols;
		}
		if (w->is_moe) {
			n_moe++;
			expert = wmat_bytes(&w->exp_gate[0]) + wmat_bytes(&w->exp_up[0]) + wmat_bytes(&w->exp_down[0]);
			active_params += 3.0 * c->num_experts_per_tok * c->moe_intermediate_size * c->hidden_size;
		}
	}
	const int V = c->vocab_size;
	if (getenv("DS_BENCH_DEV_MOE"))
		ds_cuda_backend_set_device_moe(b, atoi(getenv("DS_BENCH_DEV_MOE")));
	if (getenv("DS_BENCH_NCU"))
		return ncu_step(b, m, getenv("DS_BENCH_NCU"), bt, blocks);
	/* DS_BENCH_BATCHES / DS_BENCH_CTXS: comma lists narrowing the table */
	int batches[8] = { 1, 8, 64, 256 }, ctxs[8] = { 1024, 8192 }, nbat = 4, nctx = 2;
	if (getenv("DS_BENCH_BATCHES"))
		nbat = parse_ints(getenv("DS_BENCH_BATCHES"), batches, 8);
	if (getenv("DS_BENCH_CTXS"))
		nctx = parse_ints(getenv("DS_BENCH_CTXS"), ctxs, 8);
	printf("%-14s %6s %6s %10s %10s %10s %10s %10s %9s %10s %8s %9s\n", "model", "batch", "ctx", "step ms", "eager ms",
	       "ids ms", "no-pdl ms", "tok/s", "GB/step", "GB/s", "% roof", "TFLOP/s");
	int32_t *amax = malloc(sizeof(int32_t) * 256);
	uint8_t *none = calloc(256, 1);
	float *logits = malloc(sizeof(float) * (size_t)256 * V);
	for (int ci = 0; ci < nctx; ci++)
		for (int bi = 0; bi < nbat; bi++) {
			const int B = batches[bi], C = ctxs[ci], per = (C + bt) / bt;
			if ((long)B * per > blocks) {
				printf("%-14s %6d %6d  does not fit (%d KV blocks needed, %d in the pool)\n", label, B, C, B * per,
				       blocks);
				continue;
			}
			int32_t **tables = malloc(sizeof(int32_t *) * B);
			int *n_new = malloc(sizeof(int) * B), *pos0 = malloc(sizeof(int) * B), *lf = malloc(sizeof(int) * B);
			int32_t *tok = malloc(sizeof(int32_t) * B);
			for (int s = 0; s < B; s++) {
				tables[s] = malloc(sizeof(int32_t) * per);
				for (int i = 0; i < per; i++)
					tables[s][i] = s * per + i;
				n_new[s] = 1;
				pos0[s] = C - 1;
				lf[s] = 0;
				tok[s] = (s * 7919 + 13) % V;
			}
			ds_batch batch = { .n_seqs = B, .n_new = n_new, .pos0 = pos0, .tokens = tok,
					   .block_tables = (const int32_t *const *)tables, .logits_from = lf };
			ds_step_out out = { .logits = logits };
			/* The same steps with CUDA graphs (the default), launched kernel
			 * by kernel, and with graphs downloading token ids only (the
			 * argmax of each row: greedy decoding), one after the other. */
			double *t = malloc(sizeof(double) * (steps + 2)), *te = malloc(sizeof(double) * (steps + 2));
			double *ti = malloc(sizeof(double) * (steps + 2)), *tp = malloc(sizeof(double) * (steps + 2));
			ds_step_out ids_out = { .logits = logits, .argmax = amax, .need = none };
			int rc = 0;
			for (int pass = 0; pass < 4 && !rc; pass++) {
				double *tt = pass == 0 ? t : pass == 1 ? te : pass == 2 ? ti : tp;
				rc = ds_cuda_backend_set_graphs(b, pass != 1);
				ds_cuda_backend_set_pdl(b, pass != 3);
				for (int i = 0; i < steps + 2 && !rc; i++) {
					double a = now();
					rc = ds_cuda_backend.forward(b, &batch, pass == 2 ? &ids_out : &out, &e);
					tt[i] = now() - a;
					for (int s = 0; s < B; s++)
						tok[s] = (tok[s] + 1) % V;
				}
			}
			ds_cuda_backend_set_graphs(b, 1);
			ds_cuda_backend_set_pdl(b, 1);
			if (rc) {
				printf("%-14s %6d %6d  failed: %s\n", label, B, C, e.msg);
			} else {
				qsort(t + 2, steps, sizeof(double), cmpd);
				qsort(te + 2, steps, sizeof(double), cmpd);
				qsort(ti + 2, steps, sizeof(double), cmpd);
				qsort(tp + 2, steps, sizeof(double), cmpd);
				const double med = t[2 + steps / 2], emed = te[2 + steps / 2], imed = ti[2 + steps / 2];
				const double pmed = tp[2 + steps / 2];
				const double hit = n_moe ? c->n_routed_experts * (1 - pow(1 - (double)c->num_experts_per_tok / c->n_routed_experts, B)) : 0;
				const double bytes = dense + hit * n_moe * expert + (double)B * C * L * kvd * 2;
				const double flops = 2 * active_params * B +
						     (double)B * L * c->num_attention_heads * C * 2.0 * (2 * c->kv_lora_rank + c->qk_rope_head_dim);
				printf("%-14s %6d %6d %10.3f %10.3f %10.3f %10.3f %10.1f %9.3f %10.1f %8.1f %9.1f\n", label, B,
				       C, med * 1e3, emed * 1e3, imed * 1e3, pmed * 1e3, B / med,
				       bytes / 1e9, bytes / med / 1e9, 100 * bytes / med / bw, flops / med / 1e12);
			}
			fflush(stdout);
			for (int s = 0; s < B; s++)
				free(tables[s]);
			free(tables);
			free(n_new);
			free(pos0);
			free(lf);
			free(tok);
			free(t);
			free(te);
			free(ti);
			free(tp);
		}
	/* Where a step's time goes (synchronizing after each phase): batch 1
	 * at 1024 and the 4096-token prefill. */
	const int prof = getenv("DS_BENCH_PROFILE") && atoi(getenv("DS_BENCH_PROFILE"));
	/* Prefill: one 4096-token prompt (DS_BENCH_PREFILL=P tokens). */
	if (!getenv("DS_BENCH_NO_PREFILL") || !atoi(getenv("DS_BENCH_NO_PREFILL"))) {
		const char *pv = getenv("DS_BENCH_PREFILL");
		const int P = pv && atoi(pv) > 0 && atoi(pv) <= 4096 ? atoi(pv) : 4096, per = (P + bt - 1) / bt;
		int32_t *tab = malloc(sizeof(int32_t) * per), *tok = malloc(sizeof(int32_t) * P);
		for (int i = 0; i < per; i++)
			tab[i] = i;
		for (int i = 0; i < P; i++)
			tok[i] = (i * 31 + 7) % V;
		int n_new = P, pos0 = 0, lf = P - 1;
		const int32_t *tabs[1] = { tab };
		ds_batch batch = { .n_seqs = 1, .n_new = &n_new, .pos0 = &pos0, .tokens = tok, .block_tables = tabs,
				   .logits_from = &lf };
		ds_step_out out = { .logits = logits };
		double t[3];
		int rc = 0;
		for (int i = 0; i < 3 && !rc; i++) {
			double a = now();
			rc = ds_cuda_backend.forward(b, &batch, &out, &e);
			t[i] = now() - a;
		}
		if (!rc && prof) {
			ds_cuda_backend_set_profile(b, 1);
			rc = ds_cuda_backend.forward(b, &batch, &out, &e);
			printf("%-14s prefill profile:", label);
			for (int p = 0; p < DS_CUDA_PHASES; p++) {
				double sec;
				const char *nm = ds_cuda_backend_profile(b, p, &sec);
				printf(" %s %.1f ms;", nm, sec * 1e3);
			}
			printf("\n");
			const int32_t *t1[1] = { tab };
			int one = 1, p0 = 1023, l0 = 0;
			ds_batch d1 = { .n_seqs = 1, .n_new = &one, .pos0 = &p0, .tokens = tok, .block_tables = t1, .logits_from = &l0 };
			ds_cuda_backend_set_profile(b, 1);
			for (int i = 0; i < 5 && !rc; i++)
				rc = ds_cuda_backend.forward(b, &d1, &out, &e);
			printf("%-14s decode b=1 profile (5 steps):", label);
			for (int p = 0; p < DS_CUDA_PHASES; p++) {
				double sec;
				const char *nm = ds_cuda_backend_profile(b, p, &sec);
				printf(" %s %.2f ms;", nm, sec * 1e3 / 5);
			}
			printf("\n");
			ds_cuda_backend_set_profile(b, 0);
		}
		if (rc) {
			printf("%-14s prefill %d failed: %s\n", label, P, e.msg);
		} else {
			qsort(t + 1, 2, sizeof(double), cmpd);
			const double med = t[1];
			const double flops = 2 * active_params * P +
					     (double)L * c->num_attention_heads * P * (P / 2.0) * 2.0 * (2 * c->kv_lora_rank + c->qk_rope_head_dim);
			printf("%-14s prefill %d tokens: %.1f ms, %.0f tok/s, %.1f TFLOP/s (best of 2 after warm-up)\n", label, P,
			       med * 1e3, P / med, flops / med / 1e12);
		}
		free(tab);
		free(tok);
	}
	free(logits);
	free(amax);
	free(none);
	ds_cuda_backend.destroy(b);
	ds_model_free(m);
	return 0;
}

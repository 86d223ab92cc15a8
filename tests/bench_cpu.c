/* bench_cpu — prefill and decode tokens/s of the CPU engine on the given
 * model directories; medians of several runs, thread count printed.
 * Usage: bench_cpu DIR... (env DS_BENCH_THREADS, DS_BENCH_PROMPT) */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/engine.h"
#include "tests/bench_util.h"

int main(int argc, char **argv)
{
	int threads = getenv("DS_BENCH_THREADS") ? atoi(getenv("DS_BENCH_THREADS")) : omp_get_num_procs();
	int prompt = getenv("DS_BENCH_PROMPT") ? atoi(getenv("DS_BENCH_PROMPT")) : 128;
	enum { decode = 64, runs = 5 };
	printf("%-40s %8s %8s %14s %14s\n", "model", "threads", "prompt", "prefill tok/s", "decode tok/s");
	for (int a = 1; a < argc; a++) {
		ds_model *m;
		ds_engine *eng;
		ds_err e = { { 0 } };
		if (ds_model_open(argv[a], 0, &m, &e)) {
			fprintf(stderr, "%s\n", e.msg);
			continue;
		}
		ds_engine_config c;
		ds_engine_config_default(&c);
		c.threads = threads;
		if (ds_engine_create(m, &c, &eng, &e)) {
			fprintf(stderr, "%s\n", e.msg);
			ds_model_free(m);
			continue;
		}
		int n = prompt + decode <= m->cfg.max_position_embeddings ? prompt : m->cfg.max_position_embeddings / 2;
		int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
		unsigned x = 12345;
		for (int i = 0; i < n; i++)
			ids[i] = (int32_t)((x = x * 1103515245u + 12345u) >> 8) % m->cfg.vocab_size;
		float *lg = malloc(sizeof(float) * (size_t)m->cfg.vocab_size);
		double pf[runs], dc[runs];
		for (int r = 0; r < runs; r++) {
			ds_seq *s;
			ds_seq_new(eng, &s);
			ds_step_item it = { .seq = s, .tokens = ids, .n = n, .logits = DS_LOGITS_LAST };
			double t0 = now();
			if (ds_engine_step(eng, &it, 1, lg, NULL, &e)) {
				fprintf(stderr, "%s\n", e.msg);
				return 1;
			}
			double t1 = now();
			int32_t tok = ids[0];
			for (int i = 0; i < decode; i++) {
				it = (ds_step_item){ .seq = s, .tokens = &tok, .n = 1, .logits = DS_LOGITS_LAST };
				if (ds_engine_step(eng, &it, 1, lg, NULL, &e)) {
					fprintf(stderr, "%s\n", e.msg);
					return 1;
				}
				tok = (tok + 1) % m->cfg.vocab_size;
			}
			double t2 = now();
			pf[r] = n / (t1 - t0);
			dc[r] = decode / (t2 - t1);
			ds_seq_free(s);
		}
		qsort(pf, runs, sizeof(double), cmpd);
		qsort(dc, runs, sizeof(double), cmpd);
		printf("%-40s %8d %8d %14.1f %14.1f\n", argv[a], threads, n, pf[runs / 2], dc[runs / 2]);
		free(ids);
		free(lg);
		ds_engine_free(eng);
		ds_model_free(m);
	}
	return 0;
}

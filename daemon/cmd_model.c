/* cmd_model.c — the offline verbs that run the engine directly:
 * `dsd inspect`, `dsd logits`, `dsd generate`. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/commands.h"
#include "model/engine.h"
#include "model/npy.h"
#include "model/sampler.h"
#include "model/spec.h"
#include "model/tokenizer.h"

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* "5,17,9" -> ids; returns count or -EINVAL. */
static int parse_ids(const char *s, int32_t **out)
{
	int cap = 16, n = 0;
	int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
	if (!ids)
		return -ENOMEM;
	while (*s) {
		char *end;
		errno = 0;
		long v = strtol(s, &end, 10);
		if (end == s || errno || v < 0 || v > INT32_MAX) {
			free(ids);
			return -EINVAL;
		}
		if (n == cap) {
			cap *= 2;
			int32_t *ni = realloc(ids, sizeof(int32_t) * (size_t)cap);
			if (!ni) {
				free(ids);
				return -ENOMEM;
			}
			ids = ni;
		}
		ids[n++] = (int32_t)v;
		s = end;
		while (*s == ',' || *s == ' ')
			s++;
	}
	if (n == 0) {
		free(ids);
		return -EINVAL;
	}
	*out = ids;
	return n;
}

/* Writes s[0..n) as a JSON string literal. */
static void json_str(FILE *f, const char *s, size_t n)
{
	fputc('"', f);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\')
			fprintf(f, "\\%c", c);
		else if (c == '\n')
			fputs("\\n", f);
		else if (c == '\r')
			fputs("\\r", f);
		else if (c == '\t')
			fputs("\\t", f);
		else if (c < 0x20)
			fprintf(f, "\\u%04x", c);
		else
			fputc(c, f);
	}
	fputc('"', f);
}

static int open_model(const char *dir, ds_model **m)
{
	ds_err e = { { 0 } };
	int rc = ds_model_open(dir, 0, m, &e);
	if (rc)
		fprintf(stderr, "dsd: %s\n", e.msg[0] ? e.msg : strerror(-rc));
	return rc;
}

int ds_cmd_inspect(int argc, char **argv)
{
	static const struct option opts[] = { { "model", required_argument, 0, 'm' }, { "help", no_argument, 0, 'h' }, { 0 } };
	const char *dir = NULL;
	int c;
	while ((c = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
		if (c == 'm')
			dir = optarg;
		else {
			fprintf(c == 'h' ? stdout : stderr, "usage: dsd inspect --model DIR\n");
			return c == 'h' ? 0 : 2;
		}
	}
	if (!dir) {
		fprintf(stderr, "usage: dsd inspect --model DIR\n");
		return 2;
	}
	ds_model *m;
	if (open_model(dir, &m))
		return 1;
	const ds_config *k = &m->cfg;
	printf("model: %s\n", dir);
	printf("architecture: %s, vocab %d, hidden %d, %d layers (%d dense first), %d heads\n",
	       k->scoring_func == DS_SCORE_SIGMOID ? "DeepSeek-V3" : "DeepSeek-V2", k->vocab_size, k->hidden_size,
	       k->num_hidden_layers, k->first_k_dense_replace, k->num_attention_heads);
	printf("attention: MLA, q_lora_rank %d, kv_lora_rank %d, qk_nope %d, qk_rope %d, v %d; cache %d floats/token/layer\n",
	       k->q_lora_rank, k->kv_lora_rank, k->qk_nope_head_dim, k->qk_rope_head_dim, k->v_head_dim,
	       ds_config_kv_dim(k));
	printf("rope: theta %g, %s", k->rope_theta, k->rope.type == DS_ROPE_YARN ? "yarn" : "default");
	if (k->rope.type == DS_ROPE_YARN)
		printf(" (factor %g, original context %d, mscale %g, mscale_all_dim %g)", k->rope.factor,
		       k->rope.original_max_position_embeddings, k->rope.mscale, k->rope.mscale_all_dim);
	printf("; context %d\n", k->max_position_embeddings);
	if (k->n_routed_experts)
		printf("moe: %d routed + %d shared experts, top-%d, %s scores, %s, groups %d/%d, scale %g%s\n",
		       k->n_routed_experts, k->n_shared_experts, k->num_experts_per_tok,
		       k->scoring_func == DS_SCORE_SIGMOID ? "sigmoid" : "softmax",
		       k->topk_method == DS_TOPK_NOAUX_TC ? "noaux_tc" : k->topk_method == DS_TOPK_GREEDY ? "greedy" : "group_limited_greedy",
		       k->topk_group, k->n_group, k->routed_scaling_factor, k->norm_topk_prob ? ", normalized" : "");
	printf("mtp: %d layer(s) in the weights (config says %d)\n", m->n_mtp, k->num_nextn_predict_layers);
	printf("quantization: %s\n", k->fp8 ? "fp8 e4m3, 128x128 block scales" : "none");
	size_t count[DS_DT_COUNT] = { 0 }, bytes[DS_DT_COUNT] = { 0 }, total = 0;
	for (size_t i = 0; i < ds_weights_count(m->weights); i++) {
		const ds_tensor_ref *r = ds_weights_at(m->weights, i);
		count[r->dtype]++;
		bytes[r->dtype] += r->nbytes;
		total += r->nbytes;
	}
	printf("tensors: %zu in %d file(s), %.1f MB\n", ds_weights_count(m->weights), ds_weights_shard_count(m->weights),
	       total / 1e6);
	for (int t = 1; t < DS_DT_COUNT; t++)
		if (count[t])
			printf("  %-8s %6zu tensors %12zu bytes\n", ds_dtype_name((ds_dtype)t), count[t], bytes[t]);
	printf("missing tensors: 0\n");
	printf("unexpected tensors: %d\n", m->n_unused);
	for (size_t i = 0; i < ds_weights_count(m->weights); i++) {
		const ds_tensor_ref *r = ds_weights_at(m->weights, i);
		if (!r->used)
			printf("  unexpected: %s\n", r->name);
	}
	ds_model_free(m);
	return 0;
}

static int make_engine(const ds_model *m, const char *backend, int threads, ds_engine **eng)
{
	ds_engine_config c;
	ds_engine_config_default(&c);
	if (backend)
		c.backend = backend;
	c.threads = threads;
	ds_err e = { { 0 } };
	int rc = ds_engine_create(m, &c, eng, &e);
	if (rc)
		fprintf(stderr, "dsd: %s\n", e.msg[0] ? e.msg : strerror(-rc));
	return rc;
}

int ds_cmd_logits(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "model", required_argument, 0, 'm' }, { "ids", required_argument, 0, 'i' },
		{ "out", required_argument, 0, 'o' },   { "backend", required_argument, 0, 'b' },
		{ "threads", required_argument, 0, 't' }, { "mtp", no_argument, 0, 'M' },
		{ "help", no_argument, 0, 'h' },        { 0 }
	};
	const char *dir = NULL, *ids_s = NULL, *outp = NULL, *backend = NULL;
	int threads = 0, mtp = 0, c;
	while ((c = getopt_long(argc, argv, "m:i:o:b:t:Mh", opts, NULL)) != -1) {
		switch (c) {
		case 'm': dir = optarg; break;
		case 'i': ids_s = optarg; break;
		case 'o': outp = optarg; break;
		case 'b': backend = optarg; break;
		case 't': threads = atoi(optarg); break;
		case 'M': mtp = 1; break;
		default:
			fprintf(c == 'h' ? stdout : stderr,
				"usage: dsd logits --model DIR --ids 5,17,9 --out FILE.npy [--mtp] [--backend cpu|cuda] [--threads N]\n"
				"  writes float32 logits [n_tokens, vocab]; with --mtp the MTP module's [n_tokens-1, vocab]\n");
			return c == 'h' ? 0 : 2;
		}
	}
	if (!dir || !ids_s || !outp) {
		fprintf(stderr, "usage: dsd logits --model DIR --ids 5,17,9 --out FILE.npy\n");
		return 2;
	}
	int32_t *ids;
	int n = parse_ids(ids_s, &ids);
	if (n < 0) {
		fprintf(stderr, "dsd: --ids must be a comma-separated list of token ids\n");
		return 2;
	}
	ds_model *m = NULL;
	ds_engine *eng = NULL;
	ds_seq *s = NULL;
	float *logits = NULL, *hidden = NULL;
	int ret = 1;
	if (open_model(dir, &m) || make_engine(m, backend, threads, &eng))
		goto out;
	if (mtp && (m->n_mtp < 1 || n < 2)) {
		fprintf(stderr, "dsd: --mtp needs a model with an MTP layer and at least 2 ids\n");
		goto out;
	}
	const int V = m->cfg.vocab_size, H = m->cfg.hidden_size;
	logits = malloc(sizeof(float) * (size_t)n * V);
	hidden = malloc(sizeof(float) * (size_t)n * H);
	ds_err e = { { 0 } };
	if (!logits || !hidden || ds_seq_new(eng, &s)) {
		fprintf(stderr, "dsd: out of memory\n");
		goto out;
	}
	ds_step_item it = { .seq = s, .tokens = ids, .n = n, .logits = DS_LOGITS_ALL };
	int rc = ds_engine_step(eng, &it, 1, logits, hidden, &e);
	if (!rc && mtp) {
		ds_step_item mt = { .seq = s, .tokens = ids + 1, .n = n - 1, .logits = DS_LOGITS_ALL };
		rc = ds_engine_mtp_step(eng, 0, &mt, 1, hidden, logits, NULL, &e);
		n--;
	}
	if (rc) {
		fprintf(stderr, "dsd: %s\n", e.msg[0] ? e.msg : strerror(-rc));
		goto out;
	}
	if (ds_npy_write_f32(outp, logits, (size_t)n, (size_t)V, &e)) {
		fprintf(stderr, "dsd: %s\n", e.msg);
		goto out;
	}
	ret = 0;
out:
	ds_seq_free(s);
	ds_engine_free(eng);
	ds_model_free(m);
	free(logits);
	free(hidden);
	free(ids);
	return ret;
}

int ds_cmd_generate(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "model", required_argument, 0, 'm' },     { "ids", required_argument, 0, 'i' },
		{ "prompt", required_argument, 0, 'p' },    { "max-tokens", required_argument, 0, 'n' },
		{ "temperature", required_argument, 0, 'T' }, { "top-p", required_argument, 0, 'P' },
		{ "top-k", required_argument, 0, 'K' },     { "min-p", required_argument, 0, 'N' },
		{ "seed", required_argument, 0, 's' },      { "json", no_argument, 0, 'j' },
		{ "backend", required_argument, 0, 'b' },   { "threads", required_argument, 0, 't' },
		{ "mtp", required_argument, 0, 'D' },       { "no-mtp", no_argument, 0, 'X' },
		{ "repetition-penalty", required_argument, 0, 'r' },
		{ "presence-penalty", required_argument, 0, 'e' },
		{ "frequency-penalty", required_argument, 0, 'f' },
		{ "help", no_argument, 0, 'h' },            { 0 }
	};
	const char *dir = NULL, *ids_s = NULL, *prompt = NULL, *backend = NULL;
	int max_tokens = 64, json = 0, threads = 0, depth = -1, c; /* -1: the backend's default */
	ds_sampling sp;
	ds_sampling_default(&sp);
	while ((c = getopt_long(argc, argv, "m:i:p:n:T:P:K:N:s:jb:t:h", opts, NULL)) != -1) {
		switch (c) {
		case 'm': dir = optarg; break;
		case 'i': ids_s = optarg; break;
		case 'p': prompt = optarg; break;
		case 'n': max_tokens = atoi(optarg); break;
		case 'T': sp.temperature = strtof(optarg, NULL); break;
		case 'P': sp.top_p = strtof(optarg, NULL); break;
		case 'K': sp.top_k = atoi(optarg); break;
		case 'N': sp.min_p = strtof(optarg, NULL); break;
		case 's': sp.seed = strtoull(optarg, NULL, 10); break;
		case 'j': json = 1; break;
		case 'b': backend = optarg; break;
		case 't': threads = atoi(optarg); break;
		case 'D': depth = atoi(optarg); break;
		case 'X': depth = 0; break;
		case 'r': sp.repetition_penalty = strtof(optarg, NULL); break;
		case 'e': sp.presence_penalty = strtof(optarg, NULL); break;
		case 'f': sp.frequency_penalty = strtof(optarg, NULL); break;
		default:
			fprintf(c == 'h' ? stdout : stderr,
				"usage: dsd generate --model DIR (--prompt TEXT | --ids LIST) [--max-tokens N]\n"
				"       [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S] [--json]\n"
				"       [--repetition-penalty R] [--presence-penalty P] [--frequency-penalty F]\n"
				"       [--backend cpu|cuda] [--threads N] [--mtp DEPTH | --no-mtp]\n"
				"  speculative decoding with the model's MTP module: depth 1 by default on cuda,\n"
				"  off on the cpu (where drafting does not pay: docs/PERFORMANCE.md), as dsd\n"
				"  serve does; greedy output is the same with and without it\n");
			return c == 'h' ? 0 : 2;
		}
	}
	const char *why;
	if (depth < -1 || depth > DS_SPEC_MAX_DEPTH) {
		fprintf(stderr, "dsd generate: --mtp must be in [0, %d]\n", DS_SPEC_MAX_DEPTH);
		return 2;
	}
	if (!dir || (!ids_s == !prompt) || max_tokens < 1 || ds_sampling_validate(&sp, &why)) {
		fprintf(stderr, "dsd generate: %s\n",
			!dir ? "--model is required" : (!ids_s == !prompt) ? "give exactly one of --prompt and --ids"
			: max_tokens < 1 ? "--max-tokens must be >= 1" : why);
		return 2;
	}
	int32_t *ids = NULL;
	int n = 0;
	if (ids_s && (n = parse_ids(ids_s, &ids)) < 0) {
		fprintf(stderr, "dsd: --ids must be a comma-separated list of token ids\n");
		return 2;
	}
	/* The tokenizer is optional with --ids (test fixtures have none): then
	 * only ids are printed. */
	ds_tok *tok = NULL;
	ds_tok_stream *ts = NULL;
	{
		ds_err te = { { 0 } };
		int trc = ds_tok_load_dir(dir, &tok, &te);
		if (trc && prompt) {
			fprintf(stderr, "dsd: --prompt needs the model's tokenizer: %s\n", te.msg);
			free(ids);
			return 1;
		}
	}
	if (prompt) {
		ds_err te = { { 0 } };
		int32_t *enc = NULL;
		size_t ne = 0;
		int trc = ds_tok_encode(tok, prompt, strlen(prompt), 0, &enc, &ne, &te);
		int bos = ds_tok_add_bos(tok) ? ds_tok_bos(tok) : -1;
		if (!trc && (ids = malloc(sizeof(int32_t) * (ne + 1))) == NULL)
			trc = -ENOMEM;
		if (trc) {
			fprintf(stderr, "dsd: cannot tokenize the prompt: %s\n", te.msg[0] ? te.msg : strerror(-trc));
			free(enc);
			ds_tok_free(tok);
			return 1;
		}
		n = 0;
		if (bos >= 0)
			ids[n++] = bos;
		memcpy(ids + n, enc, sizeof(int32_t) * ne);
		n += (int)ne;
		free(enc);
		if (n == 0) {
			fprintf(stderr, "dsd: the prompt is empty\n");
			free(ids);
			ds_tok_free(tok);
			return 2;
		}
	}
	if (tok && ds_tok_stream_new(tok, DS_TOK_SKIP_SPECIAL, &ts, NULL)) {
		ds_tok_free(tok);
		free(ids);
		return 1;
	}
	ds_model *m = NULL;
	ds_engine *eng = NULL;
	ds_seq *s = NULL;
	ds_sampler *smp = NULL;
	float *logits = NULL;
	int ret = 1;
	if (open_model(dir, &m) || make_engine(m, backend, threads, &eng))
		goto out;
	const int V = m->cfg.vocab_size;
	logits = malloc(sizeof(float) * (size_t)V);
	if (!logits || ds_seq_new(eng, &s) || ds_sampler_new(&sp, V, &smp)) {
		fprintf(stderr, "dsd: out of memory\n");
		goto out;
	}
	ds_sampler_add_prompt(smp, ids, n);
	if (depth < 0)
		depth = strcmp(ds_engine_backend_name(eng), "cuda") ? 0 : 1;
	ds_err e = { { 0 } };
	ds_spec_req req;
	if (ds_spec_req_init(&req, eng, s, smp, sp.temperature == 0, depth)) {
		fprintf(stderr, "dsd: out of memory\n");
		goto out;
	}
	ds_spec_req *rp = &req;
	const char *finish = "length";
	double t0 = now_s(), t_first = 0;
	int produced = 0, rc;
	const int32_t *pp = ids;
	rc = ds_spec_prefill(eng, &rp, &pp, &n, 1, &e);
	t_first = now_s();
	while (rc == 0) {
		int stop = 0;
		for (int i = 0; i < req.n_out && !stop; i++) {
			int32_t id = req.out[i];
			produced++;
			const char *piece = NULL;
			size_t plen = 0;
			if (ts && ds_tok_stream_push(ts, id, &piece, &plen, NULL))
				piece = NULL;
			if (json) {
				printf("{\"id\":%d,\"text\":", id);
				if (ts)
					json_str(stdout, piece ? piece : "", piece ? plen : 0);
				else
					fputs("null", stdout);
				printf("}\n");
			} else if (ts) {
				fwrite(piece ? piece : "", 1, piece ? plen : 0, stdout);
			} else {
				printf("%s%d", produced > 1 ? " " : "", id);
			}
			if (id == m->cfg.eos_token_id) {
				finish = "stop";
				stop = 1;
			} else if (produced >= max_tokens) {
				stop = 1;
			}
		}
		fflush(stdout);
		if (stop)
			break;
		if (ds_seq_len(s) + 1 >= m->cfg.max_position_embeddings)
			break; /* context full: "length" */
		rc = ds_spec_step(eng, &rp, 1, &e);
	}
	if (rc) {
		fprintf(stderr, "dsd: %s\n", e.msg[0] ? e.msg : strerror(-rc));
		ds_spec_req_clear(&req);
		goto out;
	}
	if (ts && !json) {
		const char *rest;
		size_t rl;
		if (ds_tok_stream_flush(ts, &rest, &rl) == 0 && rl)
			fwrite(rest, 1, rl, stdout);
	}
	double t1 = now_s();
	double decode_s = t1 - t_first;
	if (json)
		printf("{\"done\":true,\"finish_reason\":\"%s\",\"prompt_tokens\":%d,\"generated_tokens\":%d,"
		       "\"prefill_s\":%.6f,\"tokens_per_s\":%.2f,\"mtp_depth\":%d,\"drafted\":%llu,\"accepted\":%llu}\n",
		       finish, n, produced, t_first - t0, produced > 1 ? (produced - 1) / decode_s : 0.0, req.depth,
		       (unsigned long long)req.drafted, (unsigned long long)req.accepted);
	else
		printf("\n");
	ds_spec_req_clear(&req);
	ret = 0;
out:
	ds_sampler_free(smp);
	ds_seq_free(s);
	ds_engine_free(eng);
	ds_model_free(m);
	ds_tok_stream_free(ts);
	ds_tok_free(tok);
	free(logits);
	free(ids);
	return ret;
}

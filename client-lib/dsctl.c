/* dsctl — the command-line client of dsd, built on libdsclient.
 * Exit status: 0 done, 1 the request failed, 2 usage, 3 cannot connect. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client-lib/dsclient.h"

int ds_dsctl_doctor(int argc, char **argv);

static const char *sock_path;
static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
	(void)sig;
	interrupted = 1;
}

static int connect_or_explain(ds_client **c, int no_ring)
{
	ds_client_opts o = { .name = "dsctl", .no_ring = no_ring };
	int rc = ds_client_connect(sock_path, &o, c);
	if (rc) {
		const char *p = sock_path ? sock_path : getenv("DSD_SOCKET");
		fprintf(stderr, "dsctl: cannot connect to dsd%s%s: %s\n", p ? " at " : "", p ? p : "", strerror(-rc));
		fprintf(stderr, "hint: start it with `dsd serve --socket PATH` (or `systemctl start dsd.socket`),\n"
				"      then pass --socket PATH or set DSD_SOCKET\n");
		return 3;
	}
	return 0;
}

static int fail(ds_client *c, const char *what, int rc)
{
	const char *m = ds_client_last_error(c);
	fprintf(stderr, "dsctl: %s: %s\n", what, m && *m ? m : strerror(-rc));
	return rc == -ECONNRESET ? 3 : 1;
}

static int parse_ids(const char *s, int32_t **out, size_t *n)
{
	size_t cap = 16, k = 0;
	int32_t *ids = malloc(cap * sizeof(int32_t));
	if (!ids)
		return -ENOMEM;
	while (*s) {
		char *end;
		long v = strtol(s, &end, 10);
		if (end == s || v < 0 || v > INT32_MAX) {
			free(ids);
			return -EINVAL;
		}
		if (k == cap) {
			int32_t *g = realloc(ids, (cap *= 2) * sizeof(int32_t));
			if (!g) {
				free(ids);
				return -ENOMEM;
			}
			ids = g;
		}
		ids[k++] = (int32_t)v;
		s = end;
		while (*s == ',' || *s == ' ')
			s++;
	}
	*out = ids;
	*n = k;
	return k ? 0 : -EINVAL;
}

static void json_text(FILE *f, const char *s, size_t n)
{
	cJSON *j = cJSON_CreateString("");
	char *tmp = strndup(s, n);
	if (j && tmp) {
		cJSON_SetValuestring(j, tmp);
		char *o = cJSON_PrintUnformatted(j);
		fputs(o ? o : "null", f);
		free(o);
	}
	free(tmp);
	cJSON_Delete(j);
}

static const char *finish_name(int f)
{
	static const char *const n[] = { "", "stop", "length", "cancelled", "error" };
	return f >= 0 && f <= 4 ? n[f] : "";
}

typedef struct gen_opts {
	ds_gen_params p;
	int print_ids, json, no_ring, verbose;
	int32_t *prompt_ids;
	const char *stops[16];
	const char *system;
} gen_opts;

static const struct option gen_long[] = {
	{ "max-tokens", required_argument, 0, 'n' }, { "temperature", required_argument, 0, 'T' },
	{ "top-p", required_argument, 0, 'P' },      { "top-k", required_argument, 0, 'K' },
	{ "min-p", required_argument, 0, 'M' },      { "seed", required_argument, 0, 's' },
	{ "ids", no_argument, 0, 'i' },              { "json", no_argument, 0, 'j' },
	{ "prompt-ids", required_argument, 0, 'I' }, { "stop", required_argument, 0, 'S' },
	{ "logprobs", required_argument, 0, 'L' },   { "no-ring", no_argument, 0, 'R' },
	{ "parse-special", no_argument, 0, 'X' },    { "ignore-eos", no_argument, 0, 'E' },
	{ "system", required_argument, 0, 'y' },     { "verbose", no_argument, 0, 'v' },
	{ "no-mtp", no_argument, 0, 'D' },           { "help", no_argument, 0, 'h' },
	{ "repetition-penalty", required_argument, 0, 'r' },
	{ "presence-penalty", required_argument, 0, 'e' },
	{ "frequency-penalty", required_argument, 0, 'f' },
	{ 0 }
};

static int parse_gen(int argc, char **argv, gen_opts *g, const char *verb)
{
	memset(g, 0, sizeof(*g));
	ds_gen_params_init(&g->p);
	int c;
	optind = 1;
	while ((c = getopt_long(argc, argv, "n:T:P:K:s:ijvh", gen_long, NULL)) != -1) {
		char *end = NULL;
		switch (c) {
		case 'n': g->p.max_tokens = (int32_t)strtol(optarg, &end, 10); break;
		case 'T': g->p.temperature = strtof(optarg, &end); break;
		case 'P': g->p.top_p = strtof(optarg, &end); break;
		case 'K': g->p.top_k = (int32_t)strtol(optarg, &end, 10); break;
		case 'M': g->p.min_p = strtof(optarg, &end); break;
		case 'r': g->p.repetition_penalty = strtof(optarg, &end); break;
		case 'e': g->p.presence_penalty = strtof(optarg, &end); break;
		case 'f': g->p.frequency_penalty = strtof(optarg, &end); break;
		case 's': g->p.seed = strtoull(optarg, &end, 10); g->p.has_seed = 1; break;
		case 'L': g->p.logprobs = (int32_t)strtol(optarg, &end, 10); break;
		case 'i': g->print_ids = 1; break;
		case 'j': g->json = 1; break;
		case 'v': g->verbose = 1; break;
		case 'R': g->no_ring = 1; break;
		case 'X': g->p.parse_special = 1; break;
		case 'E': g->p.ignore_eos = 1; break;
		case 'D': g->p.no_mtp = 1; break;
		case 'y': g->system = optarg; break;
		case 'I':
			if (parse_ids(optarg, &g->prompt_ids, &g->p.n_ids)) {
				fprintf(stderr, "dsctl %s: --prompt-ids takes comma-separated token ids\n", verb);
				return 2;
			}
			g->p.ids = g->prompt_ids;
			break;
		case 'S':
			if (g->p.n_stop >= 16) {
				fprintf(stderr, "dsctl %s: at most 16 --stop strings\n", verb);
				return 2;
			}
			g->stops[g->p.n_stop++] = optarg;
			g->p.stop = g->stops;
			break;
		case 'h':
			printf("usage: dsctl %s [options] %s\n"
			       "  --max-tokens N  --temperature T  --top-p P  --top-k K  --min-p P  --seed S\n"
			       "  --repetition-penalty R  --presence-penalty P  --frequency-penalty F\n"
			       "  --stop TEXT (repeatable)  --logprobs N  --ignore-eos  --parse-special\n"
			       "  --no-mtp        no speculative decoding (the same tokens, decoded one per step)\n"
			       "  --prompt-ids LIST  prompt as token ids (for models without a tokenizer)\n"
			       "  --ids           print token ids instead of text\n"
			       "  --json          one JSON object per event\n"
			       "  --no-ring       events as socket messages instead of the shared-memory ring\n"
			       "  --verbose       print the request's statistics on stderr\n%s",
			       verb, strcmp(verb, "run") ? "" : "\"PROMPT\"",
			       strcmp(verb, "chat") ? "" : "  --system TEXT   a system message first\n");
			return -1;
		default:
			return 2;
		}
		if (end && *end) {
			fprintf(stderr, "dsctl %s: bad number '%s'\n", verb, optarg);
			return 2;
		}
	}
	return 0;
}

/* Streams one request's events to stdout; returns the exit status. */
static int stream(ds_client *c, uint64_t id, const gen_opts *g, char **collect, size_t *clen)
{
	ds_event ev;
	int first = 1, cancelled = 0;
	for (;;) {
		int rc = ds_client_next_event(c, 250, &ev);
		if (interrupted && !cancelled) {
			ds_client_cancel(c, id);
			cancelled = 1;
		}
		if (rc == -ETIMEDOUT || rc == -EINTR)
			continue;
		if (rc)
			return fail(c, "stream", rc);
		if (ev.request_id != id)
			continue;
		if (g->json) {
			printf("{\"id\":%llu,\"seq\":%u,", (unsigned long long)ev.request_id, ev.seq);
			if (ev.token >= 0)
				printf("\"token\":%d,", ev.token);
			printf("\"text\":");
			json_text(stdout, ev.text, ev.text_len);
			if (!isnan(ev.logprob))
				printf(",\"logprob\":%.6g", ev.logprob);
			if (ev.n_top) {
				printf(",\"top\":[");
				for (int i = 0; i < ev.n_top; i++)
					printf("%s[%d,%.6g]", i ? "," : "", ev.top[i].token, ev.top[i].logprob);
				printf("]");
			}
			if (ev.final) {
				printf(",\"done\":true,\"finish_reason\":\"%s\"", finish_name(ev.finish));
				if (ev.error) {
					printf(",\"error\":");
					json_text(stdout, ev.error, strlen(ev.error));
				}
				printf(",\"prompt_tokens\":%u,\"generated_tokens\":%u,\"cached_tokens\":%u,"
				       "\"drafted\":%u,\"accepted\":%u,"
				       "\"ttft_ns\":%llu,\"total_ns\":%llu,\"prefill_ns\":%llu,\"decode_ns\":%llu",
				       ev.stats.prompt_tokens, ev.stats.generated_tokens, ev.stats.cached_tokens,
				       ev.stats.drafted, ev.stats.accepted,
				       (unsigned long long)ev.stats.ttft_ns, (unsigned long long)ev.stats.total_ns,
				       (unsigned long long)ev.stats.prefill_ns, (unsigned long long)ev.stats.decode_ns);
			}
			printf("}\n");
		} else if (g->print_ids) {
			if (ev.token >= 0) {
				printf("%s%d", first ? "" : " ", ev.token);
				first = 0;
			}
			if (ev.final)
				printf("\n");
		} else {
			fwrite(ev.text, 1, ev.text_len, stdout);
			if (ev.final)
				printf("\n");
		}
		if (collect && ev.text_len) {
			char *n = realloc(*collect, *clen + ev.text_len + 1);
			if (n) {
				memcpy(n + *clen, ev.text, ev.text_len);
				*clen += ev.text_len;
				n[*clen] = 0;
				*collect = n;
			}
		}
		fflush(stdout);
		if (ev.final) {
			if (g->verbose)
				fprintf(stderr, "[%s] prompt %u tokens, generated %u, ttft %.1f ms, %.1f tokens/s\n",
					finish_name(ev.finish), ev.stats.prompt_tokens, ev.stats.generated_tokens,
					ev.stats.ttft_ns / 1e6,
					ev.stats.generated_tokens > 1 && ev.stats.decode_ns
						? (ev.stats.generated_tokens - 1) / (ev.stats.decode_ns / 1e9) : 0.0);
			if (ev.finish == DS_CLIENT_FINISH_ERROR) {
				fprintf(stderr, "dsctl: the request failed: %s\n", ev.error ? ev.error : "");
				return 1;
			}
			return ev.finish == DS_CLIENT_FINISH_CANCELLED ? 1 : 0;
		}
	}
}

static int cmd_run(int argc, char **argv)
{
	gen_opts g;
	int rc = parse_gen(argc, argv, &g, "run");
	if (rc)
		return rc < 0 ? 0 : rc;
	if (!g.p.ids) {
		if (optind != argc - 1) {
			fprintf(stderr, "usage: dsctl run [options] \"PROMPT\" (or --prompt-ids LIST)\n");
			return 2;
		}
		g.p.prompt = argv[optind];
	} else if (optind != argc) {
		fprintf(stderr, "dsctl run: give a prompt or --prompt-ids, not both\n");
		free(g.prompt_ids);
		return 2;
	}
	ds_client *c;
	if ((rc = connect_or_explain(&c, g.no_ring))) {
		free(g.prompt_ids);
		return rc;
	}
	uint64_t id;
	rc = ds_client_generate(c, &g.p, &id);
	rc = rc ? fail(c, "generate", rc) : stream(c, id, &g, NULL, NULL);
	ds_client_free(c);
	free(g.prompt_ids);
	return rc;
}

static int cmd_chat(int argc, char **argv)
{
	gen_opts g;
	int rc = parse_gen(argc, argv, &g, "chat");
	if (rc)
		return rc < 0 ? 0 : rc;
	ds_client *c;
	if ((rc = connect_or_explain(&c, g.no_ring)))
		return rc;
	ds_client_msg *msgs = NULL;
	size_t n = 0;
	char **own = NULL;
	size_t n_own = 0;
	int tty = isatty(0);
	if (g.system) {
		msgs = realloc(msgs, sizeof(*msgs) * (n + 1));
		msgs[n++] = (ds_client_msg){ "system", g.system };
	}
	char *line = NULL;
	size_t cap = 0;
	rc = 0;
	for (;;) {
		if (tty) {
			fputs(">>> ", stdout);
			fflush(stdout);
		}
		ssize_t len = getline(&line, &cap, stdin);
		if (len < 0)
			break;
		while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
			line[--len] = 0;
		if (!len)
			continue;
		if (!strcmp(line, "/bye") || !strcmp(line, "/exit"))
			break;
		own = realloc(own, sizeof(char *) * (n_own + 2));
		msgs = realloc(msgs, sizeof(*msgs) * (n + 2));
		if (!own || !msgs) {
			rc = 1;
			break;
		}
		own[n_own] = strdup(line);
		msgs[n++] = (ds_client_msg){ "user", own[n_own++] };
		uint64_t id;
		int r = ds_client_chat(c, msgs, n, &g.p, &id);
		if (r) {
			rc = fail(c, "chat", r);
			break;
		}
		char *answer = NULL;
		size_t alen = 0;
		interrupted = 0;
		r = stream(c, id, &g, &answer, &alen);
		own[n_own] = answer ? answer : strdup("");
		msgs[n++] = (ds_client_msg){ "assistant", own[n_own++] };
		if (r && r != 1) {
			rc = r;
			break;
		}
	}
	free(line);
	for (size_t i = 0; i < n_own; i++)
		free(own[i]);
	free(own);
	free(msgs);
	ds_client_free(c);
	return rc;
}

static int call_json(const char *method, cJSON **out, int raw)
{
	ds_client *c;
	int rc = connect_or_explain(&c, 1);
	if (rc)
		return rc;
	char *json = NULL;
	rc = ds_client_call_json(c, method, &json);
	if (rc) {
		rc = fail(c, method, rc);
		ds_client_free(c);
		return rc;
	}
	ds_client_free(c);
	if (raw) {
		puts(json);
		free(json);
		return 0;
	}
	*out = cJSON_Parse(json);
	free(json);
	return *out ? 0 : 1;
}

static double num(const cJSON *o, const char *path)
{
	char buf[128];
	snprintf(buf, sizeof(buf), "%s", path);
	const cJSON *cur = o;
	for (char *save = NULL, *t = strtok_r(buf, ".", &save); t && cur; t = strtok_r(NULL, ".", &save))
		cur = cJSON_GetObjectItemCaseSensitive(cur, t);
	return cur && cJSON_IsNumber(cur) ? cur->valuedouble : NAN;
}

static const char *str(const cJSON *o, const char *a, const char *b)
{
	const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, a);
	if (b)
		x = cJSON_GetObjectItemCaseSensitive(x, b);
	return cJSON_IsString(x) ? x->valuestring : "?";
}

static int cmd_status(int argc, char **argv)
{
	int json = argc > 1 && !strcmp(argv[1], "--json");
	cJSON *j = NULL;
	int rc = call_json("status", &j, json);
	if (rc || json)
		return rc;
	/* while the model loads: a progress bar, redrawn on a terminal until done */
	int tty = isatty(STDOUT_FILENO), drew = 0;
	while (!strcmp(str(j, "state", NULL), "loading")) {
		double p = num(j, "load.progress");
		int w = (int)(p * 30 + 0.5);
		printf("%sloading [%.*s%*s] %3.0f%%  %.1f of %.1f GB, %.0f s%s", tty ? "\r" : "",
		       w, "##############################", 30 - w, "", 100 * p, num(j, "load.bytes_done") / 1e9,
		       num(j, "load.bytes_total") / 1e9, num(j, "load.seconds"), tty ? "" : "\n");
		fflush(stdout);
		drew = 1;
		if (!tty)
			break; /* one line, then the rest of the status */
		cJSON_Delete(j);
		j = NULL;
		if (interrupted)
			return 0;
		struct timespec ts = { 0, 250 * 1000 * 1000 };
		nanosleep(&ts, NULL);
		if ((rc = call_json("status", &j, 0)))
			return rc;
	}
	if (drew && tty)
		printf("\n");
	printf("server:   %s (pid %.0f), %s, up %.0f s\n", str(j, "server", NULL), num(j, "pid"), str(j, "state", NULL),
	       num(j, "uptime_s"));
	printf("model:    %s on %s (%.0f layers, vocab %.0f, context %.0f)\n", str(j, "model", "path"),
	       str(j, "backend", NULL), num(j, "model.layers"), num(j, "model.vocab_size"), num(j, "model.context"));
	printf("memory:   rss %.1f MiB, KV blocks %.0f/%.0f used (%.0f tokens each)\n", num(j, "memory.rss_bytes") / 1048576,
	       num(j, "memory.kv_blocks_used"), num(j, "memory.kv_blocks_total"), num(j, "memory.block_tokens"));
	printf("clients:  %.0f connected, %.0f requests\n", num(j, "clients.connected"), num(j, "clients.requests"));
	cJSON_Delete(j);
	return 0;
}

static int cmd_ps(int argc, char **argv)
{
	int json = argc > 1 && !strcmp(argv[1], "--json");
	cJSON *j = NULL;
	int rc = call_json("ps", &j, json);
	if (rc || json)
		return rc;
	printf("%-8s %-8s %-8s %-8s %8s %9s %8s\n", "ID", "UID", "PID", "STATE", "PROMPT", "GENERATED", "AGE");
	const cJSON *r;
	cJSON_ArrayForEach(r, cJSON_GetObjectItemCaseSensitive(j, "requests"))
		printf("%-8.0f %-8.0f %-8.0f %-8s %8.0f %9.0f %7.1fs\n", num(r, "id"), num(r, "uid"), num(r, "pid"),
		       str(r, "state", NULL), num(r, "prompt_tokens"), num(r, "generated"), num(r, "age_s"));
	cJSON_Delete(j);
	return 0;
}

static int cmd_stats(int argc, char **argv)
{
	int json = 0;
	double watch = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--json"))
			json = 1;
		else if (!strcmp(argv[i], "--watch"))
			watch = i + 1 < argc && argv[i + 1][0] != '-' ? atof(argv[++i]) : 1;
		else {
			fprintf(stderr, "usage: dsctl stats [--json] [--watch [SECONDS]]\n");
			return 2;
		}
	}
	for (;;) {
		cJSON *j = NULL;
		int rc = call_json("stats", &j, json);
		if (rc)
			return rc;
		if (!json) {
			printf("requests: %.0f running, %.0f waiting, %.0f paused; %.0f completed, %.0f cancelled, %.0f failed, %.0f rejected\n",
			       num(j, "requests.running"), num(j, "requests.waiting"), num(j, "requests.paused"),
			       num(j, "requests.completed"), num(j, "requests.cancelled"), num(j, "requests.failed"),
			       num(j, "requests.rejected"));
			printf("tokens:   %.0f prompt, %.0f generated, %.1f/s\n", num(j, "tokens.prompt"),
			       num(j, "tokens.generated"), num(j, "tokens.per_s"));
			printf("latency:  TTFT p50 %.1f ms p99 %.1f ms; per output token p50 %.2f ms p99 %.2f ms\n",
			       num(j, "ttft_ms.p50"), num(j, "ttft_ms.p99"), num(j, "tpot_ms.p50"), num(j, "tpot_ms.p99"));
			printf("kv:       %.0f/%.0f blocks used, %.0f cached\n", num(j, "kv.blocks_used"),
			       num(j, "kv.blocks_total"), num(j, "kv.blocks_cached"));
			printf("prefix:   %.0f of %.0f prompt tokens from cache (%.1f%%), %.0f evictions\n",
			       num(j, "prefix_cache.hit_tokens"), num(j, "prefix_cache.prompt_tokens"),
			       100 * num(j, "prefix_cache.hit_rate"), num(j, "prefix_cache.evictions"));
			if (num(j, "experts.routed") > 0)
				printf("experts:  %.0f token-expert pairs routed; busiest expert %.2fx the mean (worst layer)\n",
				       num(j, "experts.routed"), num(j, "experts.max_over_mean"));
			if (num(j, "mtp.depth") > 0)
				printf("mtp:      depth %.0f (up to %.0f sequences); %.0f drafted, %.0f accepted (%.1f%%), "
				       "%.2f tokens per decode step\n",
				       num(j, "mtp.depth"), num(j, "mtp.max_batch"), num(j, "mtp.drafted"),
				       num(j, "mtp.accepted"), 100 * num(j, "mtp.acceptance_rate"), num(j, "mtp.tokens_per_step"));
			else
				printf("mtp:      off\n");
			cJSON_Delete(j);
		}
		fflush(stdout);
		if (!watch || interrupted)
			return 0;
		usleep((useconds_t)(watch * 1e6));
		if (interrupted)
			return 0;
		if (!json)
			printf("\n");
	}
}

static int cmd_cancel(int argc, char **argv)
{
	char *end;
	if (argc != 2 || !(strtoull(argv[1], &end, 10), *argv[1]) || *end) {
		fprintf(stderr, "usage: dsctl cancel ID\n");
		return 2;
	}
	ds_client *c;
	int rc = connect_or_explain(&c, 1);
	if (rc)
		return rc;
	rc = ds_client_cancel(c, strtoull(argv[1], NULL, 10));
	rc = rc ? fail(c, "cancel", rc) : 0;
	ds_client_free(c);
	return rc;
}

static int cmd_tokenize(int argc, char **argv)
{
	int special = 0, i = 1;
	if (i < argc && !strcmp(argv[i], "--parse-special")) {
		special = 1;
		i++;
	}
	if (i != argc - 1) {
		fprintf(stderr, "usage: dsctl tokenize [--parse-special] TEXT\n");
		return 2;
	}
	ds_client *c;
	int rc = connect_or_explain(&c, 1);
	if (rc)
		return rc;
	int32_t *ids;
	size_t n;
	rc = ds_client_tokenize(c, argv[i], special, &ids, &n);
	if (rc) {
		rc = fail(c, "tokenize", rc);
	} else {
		for (size_t k = 0; k < n; k++)
			printf("%s%d", k ? " " : "", ids[k]);
		printf("\n");
		free(ids);
	}
	ds_client_free(c);
	return rc;
}

static int cmd_cache(int argc, char **argv)
{
	if (argc != 2 || strcmp(argv[1], "flush")) {
		fprintf(stderr, "usage: dsctl cache flush\n");
		return 2;
	}
	cJSON *j = NULL;
	int rc = call_json("cache_flush", &j, 0);
	cJSON_Delete(j);
	if (!rc)
		printf("prefix cache flushed\n");
	return rc;
}

/* One line per verb; `dsctl cache flush` and others add a line here. */
static const struct {
	const char *name;
	int (*fn)(int, char **);
	const char *help;
} verbs[] = {
	{ "run", cmd_run, "generate from a prompt, streaming the text" },
	{ "chat", cmd_chat, "an interactive conversation (one user turn per line)" },
	{ "status", cmd_status, "the daemon, its model and memory [--json]" },
	{ "ps", cmd_ps, "running and waiting requests [--json]" },
	{ "stats", cmd_stats, "counters and latencies [--json] [--watch [SECONDS]]" },
	{ "cancel", cmd_cancel, "cancel a request by id" },
	{ "cache", cmd_cache, "flush: forget every cached prompt prefix" },
	{ "tokenize", cmd_tokenize, "token ids of a text" },
	{ "doctor", ds_dsctl_doctor, "check the installation and print fixes" },
};

static void usage(FILE *f)
{
	fprintf(f, "usage: dsctl [--socket PATH] VERB [OPTIONS]\n\nverbs:\n");
	for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++)
		fprintf(f, "  %-10s %s\n", verbs[i].name, verbs[i].help);
	fprintf(f, "\nThe socket is --socket PATH, else $DSD_SOCKET, else $XDG_RUNTIME_DIR/dsd.sock when\n"
		   "it exists (not for root), else the system service's /run/dsd/dsd.sock.\n"
		   "Exit status: 0 done, 1 the request failed, 2 usage, 3 cannot connect.\n");
}

int main(int argc, char **argv)
{
	int i = 1;
	while (i < argc && argv[i][0] == '-') {
		if (!strcmp(argv[i], "--socket") && i + 1 < argc) {
			sock_path = argv[i + 1];
			i += 2;
		} else if (!strncmp(argv[i], "--socket=", 9)) {
			sock_path = argv[i] + 9;
			i++;
		} else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			usage(stdout);
			return 0;
		} else {
			usage(stderr);
			return 2;
		}
	}
	if (i >= argc) {
		usage(stderr);
		return 2;
	}
	struct sigaction sa = { .sa_handler = on_sigint };
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	for (size_t k = 0; k < sizeof(verbs) / sizeof(verbs[0]); k++)
		if (!strcmp(argv[i], verbs[k].name))
			return verbs[k].fn(argc - i, argv + i);
	fprintf(stderr, "dsctl: unknown verb '%s'\n", argv[i]);
	usage(stderr);
	return 2;
}

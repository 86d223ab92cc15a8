#include "conf/conf.h"

#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define F(x) offsetof(ds_conf, x), sizeof(((ds_conf *)0)->x)
#define KiB 1024.0
#define MiB (1024.0 * 1024.0)
#define GiB (1024.0 * 1024.0 * 1024.0)

static const char *const backends[] = { "cpu", "cuda", "auto", NULL };

/* One line per setting. Reloadable ones take effect on SIGHUP. */
static const ds_conf_key keys[] = {
	{ "model", "path", "model", DS_CONF_T_STRING, F(model), 0, 0, DS_DEFAULT_MODEL, 0,
	  "model directory (config.json + safetensors)", NULL },
	{ "model", "backend", "backend", DS_CONF_T_STRING, F(backend), 0, 0, "cpu", 0,
	  "compute backend: cpu, cuda, or auto (cuda when a GPU answers)", backends },
	{ "model", "threads", "threads", DS_CONF_T_INT, F(threads), 0, 1024, "0", 0,
	  "CPU threads for the engine, 0 = all cores", NULL },
	{ "model", "kv_bytes", "kv-bytes", DS_CONF_T_SIZE, F(kv_bytes), 0, 1024 * GiB, "0", 0,
	  "KV pool size in bytes (K/M/G suffixes); 0 = on the CPU room for 8 full contexts, at most 1 GiB, "
	  "on a GPU gpu_kv_fraction of the memory left after the weights", NULL },
	{ "model", "block_tokens", "block-tokens", DS_CONF_T_INT, F(block_tokens), 16, 1024, "64", 0,
	  "tokens per KV block", NULL },
	{ "model", "device", "device", DS_CONF_T_INT, F(device), 0, 63, "0", 0, "CUDA device index", NULL },
	{ "model", "uring_load", "uring-load", DS_CONF_T_INT, F(uring_load), 0, 1, "1", 0,
	  "cuda: 1 streams the weights from disk with io_uring (O_DIRECT where allowed); 0 uploads them from "
	  "the memory-mapped files", NULL },
	{ "model", "cuda_graphs", "cuda-graphs", DS_CONF_T_INT, F(cuda_graphs), 0, 1, "1", 0,
	  "cuda: 1 replays decode steps as CUDA graphs (captured per step shape on its second use); 0 launches "
	  "every kernel (slower; for debugging)", NULL },
	{ "model", "gpu_kv_fraction", "gpu-kv-fraction", DS_CONF_T_DOUBLE, F(gpu_kv_fraction), 0.01, 0.99, "0.9", 0,
	  "fraction of free GPU memory (after the weights) for the KV pool", NULL },
	{ "server", "socket", "socket", DS_CONF_T_STRING, F(socket), 0, 0, "", 0,
	  "UNIX socket path; empty = /run/dsd/dsd.sock as root, $XDG_RUNTIME_DIR/dsd.sock otherwise", NULL },
	{ "server", "socket_mode", "socket-mode", DS_CONF_T_MODE, F(socket_mode), 0, 0777, "0660", 0,
	  "permissions of the socket file (octal)", NULL },
	{ "server", "allow_users", "allow-users", DS_CONF_T_STRING, F(allow_users), 0, 0, "", 1,
	  "comma-separated user names or uids allowed to connect; empty = anyone who can open the socket", NULL },
	{ "server", "allow_groups", "allow-groups", DS_CONF_T_STRING, F(allow_groups), 0, 0, "", 1,
	  "comma-separated group names or gids allowed to connect (primary gid of the peer)", NULL },
	{ "server", "log_level", "log-level", DS_CONF_T_INT, F(log_level), 0, 7, "6", 1,
	  "syslog level: 3 errors, 4 warnings, 6 info, 7 debug", NULL },
	{ "server", "shutdown_timeout", "shutdown-timeout", DS_CONF_T_DOUBLE, F(shutdown_timeout), 0, 3600, "30", 1,
	  "seconds SIGTERM waits for running requests before cancelling them", NULL },
	{ "server", "ring_bytes", "ring-bytes", DS_CONF_T_SIZE, F(ring_bytes), 4 * KiB, 64 * MiB, "1M", 0,
	  "size of each client's shared-memory token ring (a power of two)", NULL },
	{ "limits", "max_message_bytes", "max-message-bytes", DS_CONF_T_SIZE, F(max_message_bytes), 4 * KiB, 64 * MiB,
	  "1M", 1, "largest protocol message a client may send", NULL },
	{ "limits", "max_prompt_tokens", "max-prompt-tokens", DS_CONF_T_INT, F(max_prompt_tokens), 1, 1 << 22, "32768", 1,
	  "longest prompt accepted (also bounded by the model's context)", NULL },
	{ "limits", "max_tokens", "max-tokens", DS_CONF_T_INT, F(max_tokens), 1, 1 << 22, "8192", 1,
	  "largest max_tokens a request may ask for", NULL },
	{ "limits", "default_max_tokens", "default-max-tokens", DS_CONF_T_INT, F(default_max_tokens), 1, 1 << 22, "256", 1,
	  "max_tokens of a request that does not say (capped by max_tokens)", NULL },
	{ "limits", "max_clients", "max-clients", DS_CONF_T_INT, F(max_clients), 1, 65536, "256", 1,
	  "connections served at once; more are refused", NULL },
	{ "limits", "max_requests", "max-requests", DS_CONF_T_INT, F(max_requests), 1, 65536, "256", 1,
	  "requests running or queued in total", NULL },
	{ "limits", "max_requests_per_client", "max-requests-per-client", DS_CONF_T_INT, F(max_requests_per_client), 1,
	  65536, "32", 1, "requests running or queued per connection", NULL },
	{ "limits", "max_stop", "max-stop", DS_CONF_T_INT, F(max_stop), 0, 256, "16", 1,
	  "stop strings plus stop ids per request", NULL },
	{ "limits", "max_logprobs", "max-logprobs", DS_CONF_T_INT, F(max_logprobs), 0, 32, "20", 1,
	  "most alternatives a request may ask logprobs for", NULL },
	{ "scheduler", "max_batch", "max-batch", DS_CONF_T_INT, F(max_batch), 1, 4096, "64", 0,
	  "sequences run together in one engine step; the rest wait", NULL },
	{ "scheduler", "step_tokens", "step-tokens", DS_CONF_T_INT, F(step_tokens), 16, 1 << 22, "2048", 0,
	  "tokens one engine step may run: decodes first, then prompt chunks up to this budget", NULL },
	{ "scheduler", "uid_max_running", "uid-max-running", DS_CONF_T_INT, F(uid_max_running), 0, 4096, "0", 0,
	  "sequences of one user (peer uid) running at once, 0 = no limit", NULL },
	{ "scheduler", "prefix_cache", "prefix-cache", DS_CONF_T_INT, F(prefix_cache), 0, 1, "1", 0,
	  "1: requests share the KV of identical prompt prefixes (kept until the pool needs the blocks); 0: off",
	  NULL },
	{ "scheduler", "mtp_depth", "mtp-depth", DS_CONF_T_INT, F(mtp_depth), 0, 4, "1", 0,
	  "speculative decoding: tokens drafted per step by the model's MTP module (chained beyond 1), "
	  "0 = off; ignored for models without an MTP layer", NULL },
	{ "scheduler", "mtp_max_batch", "mtp-max-batch", DS_CONF_T_INT, F(mtp_max_batch), -1, 4096, "-1", 0,
	  "draft only while a step runs at most this many sequences (larger batches are compute-bound and "
	  "verifying drafts costs more than it saves); 0 = never draft (and keep no MTP KV); -1 = the backend's "
	  "measured default (cpu 0, cuda 4)",
	  NULL },
	{ "scheduler", "mtp_chain", "mtp-chain", DS_CONF_T_INT, F(mtp_chain), -1, 1, "-1", 0,
	  "greedy drafting sequences verify and draft in one engine call: -1 = where the backend runs both on the "
	  "device (cuda), 1 = always (on the cpu the engine then runs the two steps: for testing), 0 = never",
	  NULL },
};

const ds_conf_key *ds_conf_keys(size_t *n)
{
	*n = sizeof(keys) / sizeof(keys[0]);
	return keys;
}

static int parse_int(const char *v, int mode, double *out)
{
	char *end;
	errno = 0;
	long long x = strtoll(v, &end, mode ? 8 : 0);
	if (errno || end == v)
		return -EINVAL;
	while (*end == ' ' || *end == '\t')
		end++;
	if (*end)
		return -EINVAL;
	*out = (double)x;
	return 0;
}

static int parse_size(const char *v, double *out)
{
	char *end;
	errno = 0;
	double x = strtod(v, &end);
	if (errno || end == v || !isfinite(x) || x < 0)
		return -EINVAL;
	double mul = 1;
	switch (*end) {
	case 'k': case 'K': mul = KiB; end++; break;
	case 'm': case 'M': mul = MiB; end++; break;
	case 'g': case 'G': mul = GiB; end++; break;
	default: break;
	}
	if ((*end == 'i' || *end == 'I') && mul > 1)
		end++;
	if (*end == 'b' || *end == 'B')
		end++;
	if (*end)
		return -EINVAL;
	*out = floor(x * mul);
	return 0;
}

static int set_key(ds_conf *c, const ds_conf_key *k, const char *v, ds_err *e)
{
	char *p = (char *)c + k->offset;
	double x;
	const char *kind = "an integer";
	int rc = 0;
	switch (k->type) {
	case DS_CONF_T_STRING:
		if (strlen(v) >= k->size)
			return ds_errf(e, -EINVAL, "%s.%s: value longer than %zu bytes", k->section, k->name, k->size - 1);
		if (k->choices) {
			int ok = 0;
			for (const char *const *ch = k->choices; *ch; ch++)
				ok |= !strcmp(*ch, v);
			if (!ok)
				return ds_errf(e, -EINVAL, "%s.%s: '%s' is not one of cpu, cuda, auto", k->section, k->name, v);
		}
		memcpy(p, v, strlen(v) + 1);
		return 0;
	case DS_CONF_T_DOUBLE: {
		char *end;
		errno = 0;
		x = strtod(v, &end);
		rc = (errno || end == v || *end || !isfinite(x)) ? -EINVAL : 0;
		kind = "a number";
		break;
	}
	case DS_CONF_T_SIZE:
		rc = parse_size(v, &x);
		kind = "a size";
		break;
	case DS_CONF_T_MODE:
		rc = parse_int(v, 1, &x);
		kind = "an octal mode";
		break;
	default:
		rc = parse_int(v, 0, &x);
		break;
	}
	if (rc || x < k->min || x > k->max) {
		if (k->type == DS_CONF_T_MODE)
			return ds_errf(e, -EINVAL, "%s.%s: '%s' is not %s in [0%o, 0%o]", k->section, k->name, v, kind,
				       (unsigned)k->min, (unsigned)k->max);
		return ds_errf(e, -EINVAL, "%s.%s: '%s' is not %s in [%.17g, %.17g]", k->section, k->name, v, kind,
			       k->min, k->max);
	}
	if (k->type == DS_CONF_T_DOUBLE)
		*(double *)p = x;
	else
		*(int64_t *)p = (int64_t)x;
	return 0;
}

void ds_conf_defaults(ds_conf *c)
{
	memset(c, 0, sizeof(*c));
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		set_key(c, &keys[i], keys[i].def, NULL); /* defaults are in range: test_conf checks */
}

int ds_conf_set(ds_conf *c, const char *section, const char *key, const char *value, ds_err *e)
{
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		if ((!section || !strcmp(section, keys[i].section)) && !strcmp(key, keys[i].name))
			return set_key(c, &keys[i], value, e);
	return ds_errf(e, -ENOENT, "unknown key '%s'%s%s%s", key, section ? " in [" : "", section ? section : "",
		       section ? "]" : "");
}

int ds_conf_set_flag(ds_conf *c, const char *flag, const char *value, ds_err *e)
{
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		if (!strcmp(flag, keys[i].flag))
			return set_key(c, &keys[i], value, e);
	return ds_errf(e, -ENOENT, "unknown option --%s", flag);
}

struct load_ctx {
	ds_conf *c;
	FILE *f;
	const char *path;
	int line, rc;
	ds_err *e;
};

/* inih reads one line per call; counting the calls gives the line number
 * its handler does not get in Debian's build (INI_HANDLER_LINENO is off). */
static char *reader(char *str, int num, void *stream)
{
	struct load_ctx *lc = stream;
	char *r = fgets(str, num, lc->f);
	if (r)
		lc->line++;
	return r;
}

static int handler(void *user, const char *section, const char *name, const char *value)
{
	struct load_ctx *lc = user;
	if (lc->rc)
		return 0;
	if (!name) /* a section header alone (inih >= 50 calls with name NULL) */
		return 1;
	ds_err sub = { { 0 } };
	int rc = ds_conf_set(lc->c, section, name, value, &sub);
	if (rc) {
		lc->rc = rc == -ENOENT ? -EINVAL : rc;
		ds_errf(lc->e, lc->rc, "%s:%d: %s", lc->path, lc->line, sub.msg);
		return 0;
	}
	return 1;
}

int ds_conf_load(ds_conf *c, const char *path, ds_err *e)
{
	struct load_ctx lc = { .c = c, .path = path, .e = e };
	lc.f = fopen(path, "r");
	if (!lc.f)
		return ds_errf(e, -errno, "%s: %s", path, strerror(errno));
	int r = ini_parse_stream(reader, &lc, handler, &lc);
	fclose(lc.f);
	if (lc.rc)
		return lc.rc;
	if (r > 0)
		return ds_errf(e, -EINVAL, "%s:%d: syntax error (expected [section] or key = value)", path, r);
	if (r < 0)
		return ds_errf(e, -EIO, "%s: cannot read", path);
	return 0;
}

int ds_conf_check(const ds_conf *c, ds_err *e)
{
	if (c->max_requests_per_client > c->max_requests)
		return ds_errf(e, -EINVAL, "limits.max_requests_per_client (%lld) exceeds limits.max_requests (%lld)",
			       (long long)c->max_requests_per_client, (long long)c->max_requests);
	if (c->ring_bytes & (c->ring_bytes - 1))
		return ds_errf(e, -EINVAL, "server.ring_bytes (%lld) must be a power of two", (long long)c->ring_bytes);
	if (!c->model[0])
		return ds_errf(e, -EINVAL, "model.path is empty");
	return 0;
}

void ds_conf_format(const ds_conf *c, const ds_conf_key *k, char *buf, size_t len)
{
	const char *p = (const char *)c + k->offset;
	switch (k->type) {
	case DS_CONF_T_STRING: snprintf(buf, len, "%s", p); break;
	case DS_CONF_T_DOUBLE: snprintf(buf, len, "%g", *(const double *)p); break;
	case DS_CONF_T_MODE: snprintf(buf, len, "0%llo", (unsigned long long)*(const int64_t *)p); break;
	default: snprintf(buf, len, "%lld", (long long)*(const int64_t *)p); break;
	}
}

int ds_conf_diff(const ds_conf *a, const ds_conf *b, int restart_only, char *out, size_t len)
{
	int n = 0;
	size_t used = 0;
	if (len)
		out[0] = 0;
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		const ds_conf_key *k = &keys[i];
		if (restart_only && k->reloadable)
			continue;
		const char *pa = (const char *)a + k->offset, *pb = (const char *)b + k->offset;
		int same = k->type == DS_CONF_T_STRING ? !strcmp(pa, pb) : !memcmp(pa, pb, k->size);
		if (same)
			continue;
		n++;
		if (used < len) {
			int w = snprintf(out + used, len - used, "%s%s.%s", used ? ", " : "", k->section, k->name);
			used += w > 0 ? (size_t)w : 0;
		}
	}
	return n;
}

/* conf.h — dsd's settings: one table (section, key, type, bounds, default,
 * reloadable), filled from defaults, then /etc/dsd/dsd.conf (INI, via inih),
 * then command-line flags. A ds_conf is a plain value: copy it freely.
 * No globals; any thread may use its own ds_conf. */
#ifndef DS_CONF_H
#define DS_CONF_H

#include <stddef.h>
#include <stdint.h>

#include "model/err.h"

#ifndef DS_DEFAULT_CONFIG
#define DS_DEFAULT_CONFIG "/etc/dsd/dsd.conf"
#endif
/* Relative paths are taken from the working directory: running from the
 * source tree finds the trained default model. Packages override it. */
#ifndef DS_DEFAULT_MODEL
#define DS_DEFAULT_MODEL "models/dsv3-tiny/bf16"
#endif

#define DS_CONF_STR 256

typedef struct ds_conf {
	/* [model] */
	char model[DS_CONF_STR];
	char backend[16];
	int64_t threads;
	int64_t kv_bytes;
	int64_t block_tokens;
	int64_t device;
	int64_t uring_load;
	int64_t cuda_graphs;
	double gpu_kv_fraction;
	/* [server] */
	char socket[DS_CONF_STR];
	int64_t socket_mode;
	char allow_users[DS_CONF_STR];
	char allow_groups[DS_CONF_STR];
	int64_t log_level;
	double shutdown_timeout;
	int64_t ring_bytes;
	/* [limits] */
	int64_t max_message_bytes;
	int64_t max_prompt_tokens;
	int64_t max_tokens;
	int64_t default_max_tokens;
	int64_t max_clients;
	int64_t max_requests;
	int64_t max_requests_per_client;
	int64_t max_stop;
	int64_t max_logprobs;
	/* [scheduler] */
	int64_t max_batch;
	int64_t step_tokens;
	int64_t uid_max_running;
	int64_t prefix_cache;
	int64_t mtp_depth;
	int64_t mtp_max_batch;
	int64_t mtp_chain;
} ds_conf;

enum ds_conf_type { DS_CONF_T_INT = 1, DS_CONF_T_SIZE, DS_CONF_T_DOUBLE, DS_CONF_T_STRING, DS_CONF_T_MODE };

typedef struct ds_conf_key {
	const char *section, *name;
	const char *flag;     /* command-line long option (without "--") */
	int type;
	size_t offset, size;  /* size: buffer size for strings */
	double min, max;
	const char *def;
	int reloadable;
	const char *help;
	const char *const *choices; /* strings only: NULL-terminated, or NULL for any */
} ds_conf_key;

/* The table, and its length. */
const ds_conf_key *ds_conf_keys(size_t *n);

void ds_conf_defaults(ds_conf *c);
/* Applies one setting; on error e names the key and the allowed range.
 * section may be NULL to look the key up in every section. */
int ds_conf_set(ds_conf *c, const char *section, const char *key, const char *value, ds_err *e);
/* Sets by flag name (the table's `flag`); -ENOENT when no key has it. */
int ds_conf_set_flag(ds_conf *c, const char *flag, const char *value, ds_err *e);
/* Reads an INI file over c. Errors name path:line. -ENOENT if it does not exist. */
int ds_conf_load(ds_conf *c, const char *path, ds_err *e);
/* Cross-key checks (default_max_tokens <= max_tokens, ...). */
int ds_conf_check(const ds_conf *c, ds_err *e);
/* Writes the value of k in c as text. */
void ds_conf_format(const ds_conf *c, const ds_conf_key *k, char *buf, size_t len);
/* Fills out (a comma-separated list, at most len bytes) with the keys that
 * differ between a and b; restart_only limits it to non-reloadable keys.
 * Returns how many differ. */
int ds_conf_diff(const ds_conf *a, const ds_conf *b, int restart_only, char *out, size_t len);

#endif

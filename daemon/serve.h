/* serve.h — the daemon's event loop state (serve.c) and its RPC methods
 * (methods.c). Loop thread only; the engine thread is reached through
 * batcher.h. */
#ifndef DS_SERVE_H
#define DS_SERVE_H

#include <msgpack.h>

#include "conf/conf.h"
#include "daemon/batcher.h"
#include "ipc/proto.h"
#include "model/model.h"
#include "model/tokenizer.h"

#define DS_ALLOW_MAX 64

typedef struct ds_live {
	uint64_t id;
	ds_conn *conn; /* not referenced: valid while the request lives (the conn's refs hold it) */
	uid_t uid;
} ds_live;

typedef struct ds_srv {
	ds_conf conf;
	char conf_path[DS_CONF_STR];
	int conf_required;          /* --config given: a missing file is an error */
	char **flags;               /* --key value pairs from the command line, re-applied on reload */
	int n_flags;
	ds_model *m;
	ds_engine *eng;
	ds_tok *tok;
	ds_batcher *b;
	char sock_path[DS_CONF_STR];
	int lfd, own_socket, epfd, sigfd, outefd, tfd;
	int loadefd;                 /* written when the loader thread is done */
	struct ds_loader *loader;    /* non-NULL while the engine is being created */
	int loaded;                  /* the engine runs: state "serving" */
	ds_conn *conns;
	ds_conn *dead;               /* closed, unreferenced after the epoll batch */
	int n_conns;
	uint64_t next_conn_id, next_req_id;
	ds_live *live;
	int n_live, cap_live;
	uid_t allow_uid[DS_ALLOW_MAX];
	gid_t allow_gid[DS_ALLOW_MAX];
	int n_allow_uid, n_allow_gid;
	int stopping;               /* 1 draining, 2 cancelled after the deadline */
	double t_start, load_s;
	uint64_t load_bytes;         /* streamed by io_uring (GPU), 0 with mmap */
	int load_uring;              /* 1: io_uring carried the weights; 2: it fell back to pread */
	int load_direct;             /* 1: O_DIRECT throughout */
	const char *backend;
	uint64_t rejected, protocol_errors, connections;
} ds_srv;

typedef struct ds_loader ds_loader;
/* While loading (returns 1): bytes of the weights streamed so far and in
 * all (zero when the backend streams nothing it can count). 0 otherwise. */
int ds_srv_load_snapshot(ds_srv *s, ds_wload_snapshot *sn);

/* Handles one decoded message from c. */
void ds_srv_dispatch(ds_srv *s, ds_conn *c, const ds_ipc_msg *m);
/* Queues bytes on c (and fds with their first byte); takes sb's data. */
void ds_srv_send(ds_srv *s, ds_conn *c, msgpack_sbuffer *sb, const int *fds, int nfds);
void ds_srv_error(ds_srv *s, ds_conn *c, uint32_t msgid, int code, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));

#endif

/* dsctl_doctor.c — `dsctl doctor`: checks what keeps local programs from
 * using dsd (socket group and membership, GPU device nodes, memlock limit,
 * model directory permissions for the service user, a CUDA backend without
 * a GPU) and prints the fix for each problem. Part of the dsctl program, so
 * it prints; exit status 0 when nothing is wrong, 1 when a problem was
 * found, 2 on bad usage. */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "conf/conf.h"
#include "model/err.h"

int ds_dsctl_doctor(int argc, char **argv);

#define DOC_DEFAULT_CONFIG "/etc/dsd/dsd.conf"
#define DOC_DEFAULT_SOCKET "/run/dsd/dsd.sock"
#define DOC_DEFAULT_USER "dsd"
/* Below this a running daemon cannot pin its staging buffers. */
#define DOC_MEMLOCK_MIN (64ull << 20)

struct doc {
	int problems;
	int warnings;
	/* from the configuration file */
	char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char backend[32];
	char model[PATH_MAX];
	bool have_socket_opt;
	pid_t peer_pid;      /* the process that created the socket (SO_PEERCRED) */
	/* the account dsd.service runs as */
	const char *user;
	bool user_known;
	uid_t svc_uid;
	gid_t svc_gid;
	gid_t svc_groups[64];
	int svc_ngroups;
};

static void say(const char *tag, const char *fmt, va_list ap)
{
	printf("[%s] ", tag);
	vprintf(fmt, ap);
	putchar('\n');
}

static void ok(struct doc *d, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	say(" ok ", fmt, ap);
	va_end(ap);
}

static void note(struct doc *d, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	say("info", fmt, ap);
	va_end(ap);
}

/* A problem: what is wrong, then "fix: ..." on the next line. */
static void fail(struct doc *d, const char *fix, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	say("FAIL", fmt, ap);
	va_end(ap);
	printf("       fix: %s\n", fix);
	d->problems++;
}

static void warn(struct doc *d, const char *fix, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	say("warn", fmt, ap);
	va_end(ap);
	printf("       fix: %s\n", fix);
	d->warnings++;
}

/* snprintf for messages: a path too long for the buffer is cut, which is
 * fine for text meant for a person. */
static void fmt(char *dst, size_t n, const char *f, ...)
{
	va_list ap;
	va_start(ap, f);
	vsnprintf(dst, n, f, ap);
	va_end(ap);
}

static void copy(char *dst, size_t n, const char *src)
{
	fmt(dst, n, "%s", src);
}

/* Reads the settings the daemon will read (same table, same defaults). */
static void check_config(struct doc *d, const char *path)
{
	ds_conf c;
	ds_err e = { { 0 } };
	int rc;

	ds_conf_defaults(&c);
	rc = ds_conf_load(&c, path, &e);
	if (rc == -ENOENT) {
		warn(d, "install the default with the dsd package, or pass --config PATH",
		     "%s does not exist; assuming the defaults", path);
	} else if (rc < 0) {
		fail(d, "correct it, see dsd.conf(5)", "%s", e.msg[0] ? e.msg : strerror(-rc));
		return;
	} else {
		ok(d, "configuration %s read", path);
	}
	if (!d->have_socket_opt && strlen(c.socket) >= sizeof(d->socket))
		fail(d, "use a shorter socket = path in dsd.conf", "socket path %s is too long", c.socket);
	else if (!d->have_socket_opt && c.socket[0])
		copy(d->socket, sizeof(d->socket), c.socket);
	copy(d->backend, sizeof(d->backend), c.backend);
	copy(d->model, sizeof(d->model), c.model);
}

static bool gid_in(gid_t g, const gid_t *list, int n)
{
	for (int i = 0; i < n; i++)
		if (list[i] == g)
			return true;
	return false;
}

static void lookup_user(struct doc *d)
{
	struct passwd *pw = getpwnam(d->user);
	if (!pw) {
		fail(d, "create it: sudo systemd-sysusers (the dsd package ships /usr/lib/sysusers.d/dsd.conf)",
		     "service user '%s' does not exist", d->user);
		return;
	}
	d->user_known = true;
	d->svc_uid = pw->pw_uid;
	d->svc_gid = pw->pw_gid;
	d->svc_ngroups = (int)(sizeof(d->svc_groups) / sizeof(d->svc_groups[0]));
	if (getgrouplist(d->user, pw->pw_gid, d->svc_groups, &d->svc_ngroups) < 0)
		d->svc_ngroups = (int)(sizeof(d->svc_groups) / sizeof(d->svc_groups[0]));
	ok(d, "service user '%s' exists (uid %u)", d->user, (unsigned)pw->pw_uid);
}

/* Whether the service user may access st with the permission bits in want
 * (a combination of 4 = read, 2 = write, 1 = execute/search). */
static bool svc_may(const struct doc *d, const struct stat *st, unsigned want)
{
	unsigned bits;
	if (d->svc_uid == 0)
		return true;
	if (st->st_uid == d->svc_uid)
		bits = (st->st_mode >> 6) & 7;
	else if (gid_in(st->st_gid, d->svc_groups, d->svc_ngroups))
		bits = (st->st_mode >> 3) & 7;
	else
		bits = st->st_mode & 7;
	return (bits & want) == want;
}

static const char *group_name(gid_t g, char *buf, size_t n)
{
	struct group *gr = getgrgid(g);
	if (gr)
		copy(buf, n, gr->gr_name);
	else
		snprintf(buf, n, "%u", (unsigned)g);
	return buf;
}

static const char *me(void)
{
	struct passwd *pw = getpwuid(getuid());
	return pw ? pw->pw_name : "$USER";
}

static void check_membership(struct doc *d, const struct stat *st)
{
	char gname[64], fix[256];
	gid_t groups[256];
	int n;

	group_name(st->st_gid, gname, sizeof(gname));
	if (getuid() == 0 || st->st_uid == getuid()) {
		ok(d, "you may use the socket (%s)", getuid() == 0 ? "root" : "owner");
		return;
	}
	n = getgroups((int)(sizeof(groups) / sizeof(groups[0])), groups);
	if (getgid() == st->st_gid || (n > 0 && gid_in(st->st_gid, groups, n))) {
		ok(d, "you are in group %s", gname);
		return;
	}
	/* In /etc/group already, but the session predates the change. */
	struct group *gr = getgrgid(st->st_gid);
	for (char **m = gr ? gr->gr_mem : NULL; m && *m; m++) {
		if (!strcmp(*m, me())) {
			fail(d, "log out and back in (or run `newgrp dsd`) so the session gets the group",
			     "you were added to group %s, but this session does not have it yet", gname);
			return;
		}
	}
	snprintf(fix, sizeof(fix), "sudo usermod -aG %s %s, then log out and back in", gname, me());
	fail(d, fix, "you (%s) are not in group %s, which the socket requires", me(), gname);
}

static void check_socket(struct doc *d)
{
	struct stat st;
	char gname[64];

	if (stat(d->socket, &st) < 0) {
		if (errno == EACCES)
			fail(d, "make its directory searchable: sudo chmod 0755 /run/dsd",
			     "socket %s: a directory on its path is not searchable", d->socket);
		else
			fail(d, "sudo systemctl enable --now dsd.socket",
			     "socket %s does not exist (%s)", d->socket, strerror(errno));
		return;
	}
	if (!S_ISSOCK(st.st_mode)) {
		fail(d, "remove it and restart the socket: sudo systemctl restart dsd.socket",
		     "%s exists but is not a socket", d->socket);
		return;
	}
	group_name(st.st_gid, gname, sizeof(gname));
	if (d->user_known && st.st_gid != d->svc_gid)
		fail(d, "set SocketGroup=dsd in dsd.socket (systemctl edit dsd.socket), then "
			"sudo systemctl restart dsd.socket",
		     "socket %s belongs to group %s, not to the service's group", d->socket, gname);
	else
		ok(d, "socket %s, group %s, mode %04o", d->socket, gname, (unsigned)(st.st_mode & 07777));
	if ((st.st_mode & 0060) != 0060)
		fail(d, "set SocketMode=0660 in dsd.socket, then sudo systemctl restart dsd.socket",
		     "socket %s: its group may not read and write it (mode %04o)", d->socket,
		     (unsigned)(st.st_mode & 07777));
	if (st.st_mode & 0006)
		warn(d, "set SocketMode=0660 in dsd.socket unless every local user should have access",
		     "socket %s is usable by every user (mode %04o)", d->socket,
		     (unsigned)(st.st_mode & 07777));
	check_membership(d, &st);

	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	copy(sa.sun_path, sizeof(sa.sun_path), d->socket);
	if (fd < 0) {
		fail(d, "check the process's file descriptor limit", "socket(): %s", strerror(errno));
		return;
	}
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
		struct ucred cr;
		socklen_t crl = sizeof(cr);
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &crl) == 0)
			d->peer_pid = cr.pid;
		ok(d, "connected to %s", d->socket);
	} else if (errno == ECONNREFUSED)
		fail(d, "sudo systemctl restart dsd.socket", "nothing listens on %s", d->socket);
	else if (errno == EACCES)
		fail(d, "see the group checks above", "connecting to %s: permission denied", d->socket);
	else
		fail(d, "sudo systemctl restart dsd.socket; journalctl -u dsd.socket -u dsd.service",
		     "connecting to %s: %s", d->socket, strerror(errno));
	close(fd);
}

/* Checks one /dev/nvidia* node; returns whether it is usable. */
static bool check_node(struct doc *d, const char *path, bool needed, const char *fix)
{
	struct stat st;
	if (stat(path, &st) < 0) {
		if (needed)
			fail(d, fix, "%s is missing", path);
		return false;
	}
	if (!S_ISCHR(st.st_mode)) {
		fail(d, "reload the NVIDIA driver (or reboot)", "%s is not a character device", path);
		return false;
	}
	if (d->user_known && !svc_may(d, &st, 6)) {
		char gname[64];
		fail(d, "give the group read/write (NVreg_DeviceFileMode=0660, NVreg_DeviceFileGID of "
			"\"video\"; dsd.service has SupplementaryGroups=video) or make it 0666",
		     "%s (mode %04o, group %s) is not read/writable by %s", path,
		     (unsigned)(st.st_mode & 07777), group_name(st.st_gid, gname, sizeof(gname)), d->user);
		return false;
	}
	return true;
}

/* Counts GPUs with the driver API (libcuda.so.1 comes with the driver):
 * the same answer dsd's CUDA backend will get. Returns -1 when the library
 * is absent, -2 when cuInit fails (its code in *err). */
static int cuda_gpu_count(int *err)
{
	void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
	int n = 0;
	if (!h)
		return -1;
	int (*init)(unsigned) = (int (*)(unsigned))dlsym(h, "cuInit");
	int (*count)(int *) = (int (*)(int *))dlsym(h, "cuDeviceGetCount");
	if (!init || !count) {
		dlclose(h);
		return -1;
	}
	*err = init(0);
	if (*err == 0)
		*err = count(&n);
	dlclose(h);
	return *err ? -2 : n;
}

static void check_gpu(struct doc *d)
{
	bool want_cuda = !strcmp(d->backend, "cuda");
	bool driver = access("/proc/driver/nvidia/version", F_OK) == 0;
	int gpus = 0, err = 0;
	DIR *dir;

	if (!driver) {
		if (want_cuda)
			fail(d, "install the NVIDIA driver, or set backend = auto (or cpu) in dsd.conf",
			     "backend = cuda, but no NVIDIA driver is loaded (no /proc/driver/nvidia)");
		else
			note(d, "no NVIDIA driver loaded: dsd will use the CPU backend (backend = %s)",
			     d->backend);
		return;
	}
	bool nodes = check_node(d, "/dev/nvidiactl", true, "sudo nvidia-modprobe -c0 (or reboot)");
	/* One directory per GPU (by PCI address); its node is /dev/nvidia<minor>,
	 * the "Device Minor" of its information file. */
	if ((dir = opendir("/proc/driver/nvidia/gpus"))) {
		struct dirent *e;
		char path[PATH_MAX], line[128], fix[96];
		while ((e = readdir(dir))) {
			if (e->d_name[0] == '.')
				continue;
			int minor = gpus++;
			fmt(path, sizeof(path), "/proc/driver/nvidia/gpus/%s/information", e->d_name);
			FILE *f = fopen(path, "r");
			while (f && fgets(line, sizeof(line), f))
				sscanf(line, "Device Minor: %d", &minor);
			if (f)
				fclose(f);
			snprintf(path, sizeof(path), "/dev/nvidia%d", minor);
			snprintf(fix, sizeof(fix), "sudo nvidia-modprobe -c%d (or reboot)", minor);
			nodes &= check_node(d, path, true, fix);
		}
		closedir(dir);
	}
	nodes &= check_node(d, "/dev/nvidia-uvm", true,
			    "sudo nvidia-modprobe -u -c0 (dsd.socket runs it at boot when it is installed)");
	if (nodes)
		ok(d, "NVIDIA device nodes present and usable by %s (%d GPU%s)", d->user, gpus,
		   gpus == 1 ? "" : "s");

	int n = cuda_gpu_count(&err);
	if (n > 0) {
		ok(d, "CUDA driver answers: %d GPU%s", n, n == 1 ? "" : "s");
		return;
	}
	const char *why = n == -1 ? "libcuda.so.1 cannot be loaded" : n == 0 ? "it reports no GPU" : NULL;
	char buf[64];
	if (!why) {
		snprintf(buf, sizeof(buf), "cuInit failed with CUDA error %d", err);
		why = buf;
	}
	if (want_cuda)
		fail(d, "check `nvidia-smi`; install the driver's CUDA library, or set backend = auto "
			"(or cpu) in dsd.conf",
		     "backend = cuda, but the CUDA driver does not answer: %s", why);
	else
		warn(d, "check `nvidia-smi`; dsd falls back to the CPU backend with backend = auto",
		     "an NVIDIA driver is loaded but CUDA does not answer: %s", why);
}

static unsigned long long parse_limit(const char *s)
{
	if (!strncmp(s, "unlimited", 9))
		return RLIM_INFINITY;
	return strtoull(s, NULL, 10);
}

static bool is_dsd(long pid, uid_t *uid)
{
	char path[64], line[256];
	bool yes = false;
	snprintf(path, sizeof(path), "/proc/%ld/comm", pid);
	FILE *f = fopen(path, "r");
	if (f && fgets(line, sizeof(line), f))
		yes = !strcmp(line, "dsd\n");
	if (f)
		fclose(f);
	if (!yes)
		return false;
	snprintf(path, sizeof(path), "/proc/%ld/status", pid);
	f = fopen(path, "r");
	*uid = (uid_t)-1;
	while (f && fgets(line, sizeof(line), f)) {
		unsigned u;
		if (sscanf(line, "Uid: %u", &u) == 1)
			*uid = (uid_t)u;
	}
	if (f)
		fclose(f);
	return true;
}

/* The daemon behind the checked socket: the socket's creator when that is
 * dsd itself (it bound it, or was socket-activated in place), else a dsd
 * running as the service user (under systemd, pid 1 created the socket). */
static long find_daemon(const struct doc *d)
{
	uid_t uid;
	if (d->peer_pid > 0 && is_dsd(d->peer_pid, &uid))
		return d->peer_pid;
	if (!d->user_known)
		return 0;
	DIR *proc = opendir("/proc");
	struct dirent *e;
	long pid = 0;
	while (proc && !pid && (e = readdir(proc))) {
		char *end;
		long p = strtol(e->d_name, &end, 10);
		if (!*end && p > 0 && is_dsd(p, &uid) && uid == d->svc_uid)
			pid = p;
	}
	if (proc)
		closedir(proc);
	return pid;
}

/* The memlock limit of the running daemon (read from /proc), else our own. */
static void check_memlock(struct doc *d)
{
	char path[64], line[256];
	long pid = find_daemon(d);

	if (pid) {
		snprintf(path, sizeof(path), "/proc/%ld/limits", pid);
		FILE *f = fopen(path, "r");
		unsigned long long lim = 0;
		bool found = false;
		while (f && fgets(line, sizeof(line), f)) {
			if (!strncmp(line, "Max locked memory", 17)) {
				lim = parse_limit(line + strspn(line + 17, " ") + 17);
				found = true;
			}
		}
		if (f)
			fclose(f);
		if (!found) {
			note(d, "dsd runs (pid %ld) but its limits are not readable by you", pid);
		} else if (lim != (unsigned long long)RLIM_INFINITY && lim < DOC_MEMLOCK_MIN) {
			fail(d, "LimitMEMLOCK=infinity in dsd.service (systemctl edit dsd.service), then "
				"sudo systemctl restart dsd.service",
			     "the running dsd (pid %ld) may lock only %llu KiB of memory", pid, lim >> 10);
		} else {
			ok(d, "the running dsd (pid %ld) may lock enough memory", pid);
		}
		return;
	}
	struct rlimit rl;
	if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
	    rl.rlim_cur < DOC_MEMLOCK_MIN)
		warn(d, "dsd.service sets LimitMEMLOCK=infinity; to run `dsd serve` by hand, raise it "
			"first (ulimit -l unlimited, or memlock in /etc/security/limits.d)",
		     "your memlock limit is %llu KiB: a dsd started from this shell could not pin memory",
		     (unsigned long long)rl.rlim_cur >> 10);
	else
		ok(d, "memlock limit is sufficient");
}

/* Whether every directory above path is searchable by the service user;
 * reports the first that is not. */
static bool check_parents(struct doc *d, const char *path)
{
	char buf[PATH_MAX], fix[PATH_MAX + 96];
	struct stat st;
	copy(buf, sizeof(buf), path);
	for (char *p = buf + 1; (p = strchr(p, '/')); p++) {
		*p = '\0';
		if (stat(buf, &st) == 0 && !svc_may(d, &st, 1)) {
			fmt(fix, sizeof(fix), "sudo chmod o+x %s (or setfacl -m u:%s:x %s)", buf,
				 d->user, buf);
			fail(d, fix, "%s cannot enter %s, on the way to the model", d->user, buf);
			return false;
		}
		*p = '/';
	}
	return true;
}

static void check_model(struct doc *d)
{
	char fix[PATH_MAX + 96], fpath[PATH_MAX];
	struct stat st;
	if (!d->model[0]) {
		fail(d, "set path = in the [model] section of dsd.conf", "no model directory configured");
		return;
	}
	if (!strncmp(d->model, "/tmp/", 5) || !strncmp(d->model, "/var/tmp/", 9))
		fail(d, "move the model elsewhere (e.g. /var/lib/dsd/models) and update path = in the [model] section of dsd.conf",
		     "model %s is under a temporary directory, which dsd.service does not see "
		     "(PrivateTmp=yes)", d->model);
	if (stat(d->model, &st) < 0) {
		fail(d, "correct path = in the [model] section of dsd.conf", "model %s: %s", d->model, strerror(errno));
		return;
	}
	if (!S_ISDIR(st.st_mode)) {
		fail(d, "path = ([model]) must name the directory holding config.json and *.safetensors",
		     "model %s is not a directory", d->model);
		return;
	}
	if (!d->user_known) {
		note(d, "model directory permissions not checked (no service user)");
		return;
	}
	if (!check_parents(d, d->model))
		return;
	fmt(fix, sizeof(fix), "sudo chmod -R o+rX %s (or setfacl -R -m u:%s:rX %s)", d->model,
		 d->user, d->model);
	if (!svc_may(d, &st, 5)) {
		fail(d, fix, "%s cannot list the model directory %s (mode %04o)", d->user, d->model,
		     (unsigned)(st.st_mode & 07777));
		return;
	}
	DIR *dir = opendir(d->model);
	struct dirent *e;
	int bad = 0, files = 0;
	bool config = false;
	while (dir && (e = readdir(dir))) {
		if (e->d_name[0] == '.')
			continue;
		fmt(fpath, sizeof(fpath), "%s/%s", d->model, e->d_name);
		if (stat(fpath, &st) < 0 || !S_ISREG(st.st_mode))
			continue;
		files++;
		config |= !strcmp(e->d_name, "config.json");
		if (!svc_may(d, &st, 4)) {
			if (!bad)
				fail(d, fix, "%s cannot read %s (mode %04o)", d->user, fpath,
				     (unsigned)(st.st_mode & 07777));
			bad++;
		}
	}
	if (dir)
		closedir(dir);
	if (!config)
		fail(d, "path = ([model]) must name a directory with config.json and *.safetensors",
		     "%s has no config.json", d->model);
	if (!bad && config)
		ok(d, "model %s: %d files, all readable by %s", d->model, files, d->user);
	else if (bad > 1)
		printf("       (%d files in all are unreadable)\n", bad);
}

static void backend_built(struct doc *d)
{
#ifndef DS_HAVE_CUDA
	if (!strcmp(d->backend, "cuda"))
		fail(d, "install a dsd built with the CUDA toolkit, or set backend = auto (or cpu)",
		     "backend = cuda, but this dsd was built without the CUDA backend");
#else
	(void)d;
#endif
}

static void usage(FILE *f)
{
	fprintf(f, "usage: dsctl doctor [--config PATH] [--socket PATH] [--user NAME]\n"
		   "Checks what keeps local programs from using dsd and prints a fix for each\n"
		   "problem. Exit status: 0 all good, 1 problems found, 2 bad usage.\n"
		   "  --config PATH  configuration file (default " DOC_DEFAULT_CONFIG ")\n"
		   "  --socket PATH  socket to check (default: from the configuration, else "
		   DOC_DEFAULT_SOCKET ")\n"
		   "  --user NAME    account the service runs as (default " DOC_DEFAULT_USER ")\n");
}

int ds_dsctl_doctor(int argc, char **argv)
{
	struct doc d = { .user = DOC_DEFAULT_USER };
	const char *config = DOC_DEFAULT_CONFIG;

	copy(d.socket, sizeof(d.socket), DOC_DEFAULT_SOCKET);
	copy(d.backend, sizeof(d.backend), "auto");
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			usage(stdout);
			return 0;
		}
		if (i + 1 >= argc || (strcmp(a, "--config") && strcmp(a, "--socket") && strcmp(a, "--user"))) {
			usage(stderr);
			return 2;
		}
		const char *v = argv[++i];
		if (!strcmp(a, "--config")) {
			config = v;
		} else if (!strcmp(a, "--user")) {
			d.user = v;
		} else {
			if (strlen(v) >= sizeof(d.socket)) {
				fprintf(stderr, "dsctl doctor: socket path too long\n");
				return 2;
			}
			copy(d.socket, sizeof(d.socket), v);
			d.have_socket_opt = true;
		}
	}

	check_config(&d, config);
	lookup_user(&d);
	check_socket(&d);
	backend_built(&d);
	check_gpu(&d);
	check_memlock(&d);
	check_model(&d);

	printf("%d problem%s, %d warning%s\n", d.problems, d.problems == 1 ? "" : "s", d.warnings,
	       d.warnings == 1 ? "" : "s");
	fflush(stdout);
	return d.problems ? 1 : 0;
}

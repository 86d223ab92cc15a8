/* client_smoke.c — built by check_packaging.sh against the installed
 * libdsclient-dev (`pkg-config --cflags --libs dsclient`) and run against
 * the installed daemon: connects to SOCKET, reads the status, generates
 * exactly 4 tokens (ignore_eos) through the shared-memory ring, and checks
 * the events: 4 tokens numbered 0..3, then a final LENGTH event whose
 * statistics count 4 generated tokens. Exit 0 when all holds. */
#include <dsclient.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
	ds_client *c = NULL;
	ds_gen_params p;
	ds_event ev;
	uint64_t id;
	char *json = NULL;
	int rc, tokens = 0;

	if (argc != 2) {
		fprintf(stderr, "usage: client_smoke SOCKET\n");
		return 2;
	}
	if ((rc = ds_client_connect(argv[1], NULL, &c)) < 0) {
		fprintf(stderr, "connect: %s\n", strerror(-rc));
		return 1;
	}
	if ((rc = ds_client_call_json(c, "status", &json)) < 0 || !strstr(json, "\"model\"")) {
		fprintf(stderr, "status: %d %s\n", rc, json ? json : ds_client_last_error(c));
		return 1;
	}
	free(json);
	ds_gen_params_init(&p);
	p.prompt = "Hello";
	p.max_tokens = 4;
	p.ignore_eos = 1;
	if ((rc = ds_client_generate(c, &p, &id)) < 0) {
		fprintf(stderr, "generate: %s\n", ds_client_last_error(c));
		return 1;
	}
	for (;;) {
		if ((rc = ds_client_next_event(c, 60000, &ev)) < 0) {
			fprintf(stderr, "next_event: %s\n", strerror(-rc));
			return 1;
		}
		if (ev.request_id != id)
			continue;
		if (ev.final)
			break;
		if ((int)ev.seq != tokens || ev.token < 0) {
			fprintf(stderr, "event %d: seq %u token %d\n", tokens, ev.seq, ev.token);
			return 1;
		}
		tokens++;
	}
	if (tokens != 4 || ev.finish != DS_CLIENT_FINISH_LENGTH || ev.stats.generated_tokens != 4) {
		fprintf(stderr, "final: %d tokens, finish %d, stats %u\n", tokens, ev.finish,
			ev.stats.generated_tokens);
		return 1;
	}
	c = ds_client_free(c);
	printf("client_smoke: 4 tokens through the ring, finish LENGTH\n");
	return 0;
}

/* dsclient_example.c — the smallest libdsclient program: connect, generate
 * greedily from four token ids, print each token as it arrives.
 *   cc dsclient_example.c $(pkg-config --cflags --libs dsclient)
 *   ./a.out [SOCKET]      (default: $DSD_SOCKET or the per-user socket) */
#include <dsclient.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
	ds_client *c;
	int rc = ds_client_connect(argc > 1 ? argv[1] : NULL, NULL, &c);
	if (rc) {
		fprintf(stderr, "connect: %s\n", strerror(-rc));
		return 3;
	}
	static const int32_t prompt[] = { 5, 6, 7, 8 };
	ds_gen_params p;
	ds_gen_params_init(&p);
	p.ids = prompt;
	p.n_ids = 4;
	p.max_tokens = 16;
	p.temperature = 0; /* greedy */
	uint64_t id;
	rc = ds_client_generate(c, &p, &id);
	if (rc) {
		fprintf(stderr, "generate: %s: %s\n", strerror(-rc), ds_client_last_error(c));
		ds_client_free(c);
		return 1;
	}
	ds_event ev;
	int n = 0;
	while ((rc = ds_client_next_event(c, -1, &ev)) == 0) {
		if (ev.final) {
			printf("\n");
			break;
		}
		printf("%s%d", n++ ? " " : "", ev.token); /* ev.text holds the text piece when the model has a tokenizer */
		fflush(stdout);
	}
	ds_client_free(c);
	return rc || ev.finish == DS_CLIENT_FINISH_ERROR;
}

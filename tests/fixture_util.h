/* fixture_util.h — helpers shared by tests that read the transformers
 * fixtures under tests/fixtures/ (see tools/make_fixtures.py). */
#ifndef DS_TEST_FIXTURE_UTIL_H
#define DS_TEST_FIXTURE_UTIL_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
	char name[32];
	int32_t *ids;
	int n;
	char logits[64], mtp_logits[64];
	int greedy_prompt_len;
	int32_t *greedy_ids;
	float *greedy_margins;
	int n_greedy;
} fx_seq;

typedef struct {
	char dir[512];
	fx_seq *seqs;
	int n_seqs;
} fx_ref;

/* Root of the source tree (tests run from it; DS_SRCDIR overrides). */
const char *fx_srcdir(void);
/* Loads <srcdir>/tests/fixtures/<name>/ref/ref.json; 0 or -errno. */
int fx_load(const char *name, fx_ref *out);
void fx_free(fx_ref *r);
/* Loads a .npy from the fixture's ref/ folder. */
int fx_npy(const fx_ref *r, const char *file, float **data, size_t *rows, size_t *cols);
/* A fresh temporary directory (mkdtemp); caller removes it with fx_rmtree. */
int fx_tmpdir(char *out, size_t len);
void fx_rmtree(const char *dir);
int fx_copy_file(const char *from, const char *to);

struct ds_engine;
/* ds_engine_step_ids against ds_engine_step on the same batch (fresh
 * sequences, prompts from ids[0..n), n >= 24): each row's id is the first
 * maximal index of the reference logits row, and a row that is not
 * argmax-only equals the reference bit for bit. 0, or -1 with why. */
int fx_check_step_ids(struct ds_engine *eng, const int32_t *ids, int n, char *why, size_t whylen);
/* ds_engine_step_chain against its definition, ds_engine_step_ids followed
 * by ds_engine_mtp_step_ids over the chained items (tokens = the step's ids,
 * hidden = its hidden rows), on twin sets of 4 sequences (prompts from
 * ids[0..n), n >= 32; 3 chained items of 2 tokens, 1 plain item) for 3
 * steps: main ids, MTP ids, hidden rows, the plain item's logits row and
 * the KV lengths equal bit for bit. With depth > 1 the deeper passes too,
 * against MTP steps of one position from each item's accepted row. Needs a
 * model with an MTP layer. 0, or -1 with why. */
int fx_check_step_chain(struct ds_engine *eng, const int32_t *ids, int n, int depth, char *why, size_t whylen);

#endif

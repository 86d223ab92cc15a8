/* commands.h — the verbs of the dsd binary; main.c dispatches to them.
 * Each returns the process exit status (0 ok, 1 failure, 2 usage). */
#ifndef DS_COMMANDS_H
#define DS_COMMANDS_H

int ds_cmd_inspect(int argc, char **argv);
int ds_cmd_logits(int argc, char **argv);
int ds_cmd_generate(int argc, char **argv);
int ds_cmd_tokenize(int argc, char **argv);
int ds_cmd_detokenize(int argc, char **argv);
int ds_cmd_serve(int argc, char **argv);
int ds_cmd_check_config(int argc, char **argv);

#endif

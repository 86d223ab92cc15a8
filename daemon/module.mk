# daemon/: the dsd binary (offline verbs and `dsd serve`).
PROGS += dsd
dsd_SRCS := $(sort $(wildcard daemon/*.c))

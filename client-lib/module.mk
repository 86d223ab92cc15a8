# client-lib/: libdsclient (shared, soname libdsclient.so.0) and dsctl.
DSCLIENT_SRCS := client-lib/dsclient.c
PROGS += dsctl
dsctl_SRCS := client-lib/dsctl.c $(DSCLIENT_SRCS) $(filter-out client-lib/dsctl.c,$(wildcard client-lib/dsctl_*.c))

# The shared library: its own objects plus the ipc/ code it needs; only the
# symbols in libdsclient.map are exported. msgpack-c is linked dynamically
# here (Debian's libmsgpackc.a is not position-independent).
DSCLIENT_OBJS := $(patsubst %.c,$(BUILD)/obj/%.o,$(DSCLIENT_SRCS) ipc/prescan.c ipc/proto.c ipc/ring.c)
$(BUILD)/lib/libdsclient.so.0: $(DSCLIENT_OBJS) client-lib/libdsclient.map
	@mkdir -p $(@D)
	$(CC) -shared -fopenmp $(if $(SANITIZE),-fsanitize=$(SANITIZE)) -Wl,-soname,libdsclient.so.0 \
		-Wl,--version-script=client-lib/libdsclient.map -Wl,-z,defs -o $@ $(DSCLIENT_OBJS) -lmsgpackc
	ln -sf libdsclient.so.0 $(BUILD)/lib/libdsclient.so
$(BUILD)/lib/dsclient.pc: client-lib/dsclient.pc.in
	@mkdir -p $(@D)
	sed -e 's|@PREFIX@|$(abspath $(BUILD))|' -e 's|@LIBDIR@|$(abspath $(BUILD))/lib|' \
		-e 's|@INCLUDEDIR@|$(abspath client-lib)|' -e 's|@VERSION@|0.1|' $< > $@
EXTRA_ALL += $(BUILD)/lib/libdsclient.so.0 $(BUILD)/lib/dsclient.pc

# packaging/: `make install` (DESTDIR and PREFIX aware), `make deb`, `make rpm`
# and `make check-packaging` (builds, installs and purges the .deb: root only).

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SBINDIR ?= $(PREFIX)/sbin
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
DATADIR ?= $(PREFIX)/share
MANDIR ?= $(DATADIR)/man
SYSCONFDIR ?= $(if $(filter /usr,$(PREFIX)),/etc,$(PREFIX)/etc)
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
MODELDIR ?= $(DATADIR)/dsd/models
# The embedded model (models/<name>/...) and the directory the daemon's
# built-in default names inside it (conf/conf.h: DS_DEFAULT_MODEL).
DEFAULT_MODEL := dsv3-tiny
DEFAULT_MODEL_PATH := $(shell sed -n 's|^\#define DS_DEFAULT_MODEL "models/\(.*\)"|\1|p' conf/conf.h)

DS_VERSION := $(shell head -1 packaging/debian/changelog | cut -d' ' -f2 | tr -d '()')
DSCLIENT_SO ?= $(BUILD)/lib/libdsclient.so.0
PKG_MANPAGES := $(wildcard packaging/man/*.[1-8])

# What `make install` installs, built without the tests and benchmarks.
install-bins: $(BUILD)/bin/dsd $(BUILD)/bin/dsctl $(DSCLIENT_SO)

install: install-bins
	@set -e; d='$(DESTDIR)'; \
	install -d "$$d$(BINDIR)" "$$d$(SBINDIR)" "$$d$(LIBDIR)/pkgconfig" "$$d$(INCLUDEDIR)" \
		"$$d$(SYSCONFDIR)/dsd" "$$d$(UNITDIR)" "$$d$(SYSUSERSDIR)" "$$d$(MODELDIR)"; \
	install -m 0755 $(BUILD)/bin/dsd "$$d$(SBINDIR)/dsd"; \
	install -m 0755 $(BUILD)/bin/dsctl "$$d$(BINDIR)/dsctl"; \
	install -m 0755 $(DSCLIENT_SO) "$$d$(LIBDIR)/libdsclient.so.0"; \
	ln -sf libdsclient.so.0 "$$d$(LIBDIR)/libdsclient.so"; \
	install -m 0644 client-lib/dsclient.h "$$d$(INCLUDEDIR)/dsclient.h"; \
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@LIBDIR@|$(LIBDIR)|g' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|g' \
		-e 's|@VERSION@|$(DS_VERSION)|g' client-lib/dsclient.pc.in > "$$d$(LIBDIR)/pkgconfig/dsclient.pc"; \
	chmod 0644 "$$d$(LIBDIR)/pkgconfig/dsclient.pc"; \
	for u in dsd.service dsd.socket; do \
		sed -e 's|/usr/sbin/dsd|$(SBINDIR)/dsd|g' -e 's|/etc/dsd/|$(SYSCONFDIR)/dsd/|g' \
			packaging/systemd/$$u > "$$d$(UNITDIR)/$$u"; chmod 0644 "$$d$(UNITDIR)/$$u"; \
	done; \
	install -m 0644 packaging/sysusers/dsd.conf "$$d$(SYSUSERSDIR)/dsd.conf"; \
	packaging/default-conf.sh conf/dsd.conf.example "$(MODELDIR)/$(DEFAULT_MODEL_PATH)" \
		> "$$d$(SYSCONFDIR)/dsd/dsd.conf"; \
	chmod 0644 "$$d$(SYSCONFDIR)/dsd/dsd.conf"; \
	test -f models/$(DEFAULT_MODEL_PATH)/config.json || \
		{ echo "install: models/$(DEFAULT_MODEL_PATH) has no model" >&2; exit 1; }; \
	rm -rf "$$d$(MODELDIR)/$(DEFAULT_MODEL)"; install -d "$$d$(MODELDIR)/$(DEFAULT_MODEL)"; \
	for m in models/$(DEFAULT_MODEL)/*/config.json; do \
		cp -R "$${m%/config.json}" "$$d$(MODELDIR)/$(DEFAULT_MODEL)/"; \
	done; \
	for f in models/$(DEFAULT_MODEL)/*.md; do if [ -f "$$f" ]; then cp "$$f" "$$d$(MODELDIR)/$(DEFAULT_MODEL)/"; fi; done; \
	def=$(notdir $(DEFAULT_MODEL_PATH)); \
	for v in "$$d$(MODELDIR)/$(DEFAULT_MODEL)"/*/; do \
		v=$${v%/}; [ "$${v##*/}" = "$$def" ] && continue; \
		for f in "$$v"/*; do \
			o="$$d$(MODELDIR)/$(DEFAULT_MODEL)/$$def/$${f##*/}"; \
			if [ -f "$$o" ] && cmp -s "$$f" "$$o"; then ln -sf "../$$def/$${f##*/}" "$$f"; fi; \
		done; \
	done; \
	find "$$d$(MODELDIR)/$(DEFAULT_MODEL)" -type d -exec chmod 0755 {} +; \
	find "$$d$(MODELDIR)/$(DEFAULT_MODEL)" -type f -exec chmod 0644 {} +; \
	for m in $(PKG_MANPAGES); do \
		s=$${m##*.}; install -d "$$d$(MANDIR)/man$$s"; \
		install -m 0644 $$m "$$d$(MANDIR)/man$$s/"; \
	done

# Packages are built from a copy of the source tree (tracked and untracked,
# not ignored, files) under $(BUILD)/deb or $(BUILD)/rpm.
deb:
	packaging/build-deb.sh $(BUILD)/deb

rpm:
	packaging/build-rpm.sh $(BUILD)/rpm

check-packaging:
	@./scripts/deps-packaging.sh
	@DS_BUILD=$(BUILD) bash tests/packaging/run.sh

.PHONY: install install-bins deb rpm check-packaging

# Regenerates the KEYS section of dsd.conf(5) from conf/'s settings table.
$(BUILD)/gen_conf_keys: packaging/man/gen_conf_keys.c $(LIBDS)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(LIBDS) $(LDLIBS)

man-conf: $(BUILD)/gen_conf_keys
	$(BUILD)/gen_conf_keys > $(BUILD)/conf-keys.roff
	awk -v keys=$(BUILD)/conf-keys.roff '/^\.SH KEYS$$/ { print; while ((getline l < keys) > 0) print l; skip = 1; next } \
		/^\.SH / { skip = 0 } !skip' packaging/man/dsd.conf.5 > $(BUILD)/dsd.conf.5.new
	mv $(BUILD)/dsd.conf.5.new packaging/man/dsd.conf.5

.PHONY: man-conf

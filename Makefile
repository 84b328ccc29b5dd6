# cwreap: build, install, package.
#   make                      build the release binary, the man pages and the completions
#   sudo make install PREFIX=/usr/local [DESTDIR=/tmp/root]   install what `make` built
#   make deb                  build a .deb (installs cargo-deb first when it is missing)
#   sudo make uninstall PREFIX=...
#   make bpf [BPF_OUT=path] [BPF_WHERE_OUT=path]   rebuild the checked-in BPF objects (needs clang-14; cargo never does)
# `make install` never runs cargo: build as yourself, then install as root (sudo needs no
# Rust toolchain). It installs what the .deb installs, under PREFIX.
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR ?= /lib/systemd/system
DESTDIR ?=
CARGO ?= cargo
ASSETS := target/assets
BIN := target/release/cwreap
GENERATED := $(ASSETS)/cwreap.8 $(ASSETS)/cwreap.yaml.5 $(ASSETS)/cwreap.bash $(ASSETS)/_cwreap $(ASSETS)/cwreap.fish
DOCDIR = $(DESTDIR)$(PREFIX)/share/doc/cwreap
DROPINDIR = $(DESTDIR)$(PREFIX)/share/cwreap/drop-ins

.PHONY: all build assets built install uninstall deb test clean bpf

all: assets

build:
	$(CARGO) build --release --locked --bin cwreap

assets: build
	$(BIN) generate --out-dir $(ASSETS)

# What install needs, built beforehand by `make`.
built:
	@for f in $(BIN) $(GENERATED); do \
		[ -e "$$f" ] || { echo "make install: $$f is missing: run 'make' first (as yourself; installing needs no Rust toolchain)" >&2; exit 1; }; \
	done

install: built
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/cwreap
	install -D -m 0644 $(ASSETS)/cwreap.8 $(DESTDIR)$(PREFIX)/share/man/man8/cwreap.8
	install -D -m 0644 $(ASSETS)/cwreap.yaml.5 $(DESTDIR)$(PREFIX)/share/man/man5/cwreap.yaml.5
	install -D -m 0644 $(ASSETS)/cwreap.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/cwreap
	install -D -m 0644 $(ASSETS)/_cwreap $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_cwreap
	install -D -m 0644 $(ASSETS)/cwreap.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/cwreap.fish
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed 's|/usr/bin/cwreap|$(PREFIX)/bin/cwreap|' systemd/cwreap.service > $(DESTDIR)$(UNITDIR)/cwreap.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/cwreap.service
	@# Opt-in drop-ins (containers, destroy, escalate, events, ...): copied, never enabled.
	for f in systemd/drop-ins/*.conf; do \
		install -D -m 0644 $$f $(DROPINDIR)/$$(basename $$f); \
	done
	@# As the .deb: the example policies, the alert rules, the DaemonSet, the README.
	for f in config/examples/* deploy/kubernetes/cwreap-daemonset.yaml; do \
		install -D -m 0644 $$f $(DOCDIR)/examples/$$(basename $$f); \
	done
	install -D -m 0644 config/cwreap.rules.yml $(DOCDIR)/cwreap.rules.yml
	install -D -m 0644 README.md $(DOCDIR)/README.md
	install -D -m 0644 config/logrotate/cwreap $(DESTDIR)$(SYSCONFDIR)/logrotate.d/cwreap
	@# Never overwrite a policy an operator already edited.
	test -e $(DESTDIR)$(SYSCONFDIR)/cwreap/cwreap.yaml || \
		install -D -m 0600 config/cwreap.yaml $(DESTDIR)$(SYSCONFDIR)/cwreap/cwreap.yaml
	@echo
	@echo "Installed cwreap in $(DESTDIR)$(PREFIX)/bin, the unit in $(DESTDIR)$(UNITDIR), the policy in $(DESTDIR)$(SYSCONFDIR)/cwreap/cwreap.yaml."
	@echo "Examples and alert rules: $(DOCDIR)/"
	@echo "Opt-in drop-ins (not enabled): $(DROPINDIR)/"
	@echo "  to use one: install -D -m 0644 $(DROPINDIR)/destroy.conf /etc/systemd/system/cwreap.service.d/destroy.conf"
	@echo "Then: systemctl daemon-reload; cwreap check --config $(SYSCONFDIR)/cwreap/cwreap.yaml; systemctl enable --now cwreap"

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/cwreap $(DESTDIR)$(PREFIX)/share/man/man8/cwreap.8 \
		$(DESTDIR)$(PREFIX)/share/man/man5/cwreap.yaml.5 \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions/cwreap \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions/_cwreap \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/cwreap.fish \
		$(DESTDIR)$(UNITDIR)/cwreap.service \
		$(DESTDIR)$(SYSCONFDIR)/logrotate.d/cwreap
	rm -rf $(DROPINDIR) $(DOCDIR)
	-rmdir $(DESTDIR)$(PREFIX)/share/cwreap 2>/dev/null

deb: all
	@$(CARGO) deb --version >/dev/null 2>&1 || { \
		echo "make deb: cargo-deb is missing; installing it: $(CARGO) install --locked cargo-deb"; \
		$(CARGO) install --locked cargo-deb; }
	$(CARGO) deb --no-build

# Every test, also those that need root: run it as root.
test:
	$(CARGO) test --locked --workspace --no-fail-fast -- --include-ignored

# The BPF object is checked in and embedded, so cargo never needs clang. This rebuilds it
# with the pinned compiler (Debian 12's clang-14), reproducibly: it compiles from inside
# linux/bpf with the directory mapped to `.` (BTF keeps source file names), with no system
# headers, and strips the DWARF while keeping .BTF and .BTF.ext for CO-RE.
BPF_CLANG ?= clang-14
BPF_STRIP ?= llvm-strip-14
BPF_DIR := $(CURDIR)/linux/bpf
BPF_OUT ?= $(BPF_DIR)/cwreap.bpf.o
# `explain --where`'s programs, a separate object.
BPF_WHERE_OUT ?= $(BPF_DIR)/where.bpf.o

bpf:
	@command -v $(BPF_CLANG) >/dev/null && command -v $(BPF_STRIP) >/dev/null || { \
		echo "make bpf: needs $(BPF_CLANG) and $(BPF_STRIP): apt-get install --no-install-recommends clang-14 llvm-14" >&2; \
		exit 1; }
	@out="$(abspath $(BPF_OUT))"; tmp="$$out.tmp.$$$$"; \
	cd $(BPF_DIR) && \
	$(BPF_CLANG) -target bpfel -mcpu=v3 -O2 -g -nostdinc -Wall -Werror \
		-fdebug-prefix-map=$(BPF_DIR)=. -fno-ident \
		-c cwreap.bpf.c -o "$$tmp" && \
	$(BPF_STRIP) -g "$$tmp" && \
	mv "$$tmp" "$$out" && echo "bpf: $$out"
	@out="$(abspath $(BPF_WHERE_OUT))"; tmp="$$out.tmp.$$$$"; \
	cd $(BPF_DIR) && \
	$(BPF_CLANG) -target bpfel -mcpu=v3 -O2 -g -nostdinc -Wall -Werror \
		-fdebug-prefix-map=$(BPF_DIR)=. -fno-ident \
		-c where.bpf.c -o "$$tmp" && \
	$(BPF_STRIP) -g "$$tmp" && \
	mv "$$tmp" "$$out" && echo "bpf: $$out"

clean:
	$(CARGO) clean

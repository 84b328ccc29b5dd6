# cwreap: build, install, package.
#   make                      build the release binary
#   make install PREFIX=/usr/local [DESTDIR=/tmp/root]
#   make deb                  build a .deb (installs cargo-deb first when it is missing)
#   make uninstall PREFIX=...
#   make bpf [BPF_OUT=path]   rebuild the checked-in BPF object (needs clang-14; cargo never does)
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR ?= /lib/systemd/system
DESTDIR ?=
CARGO ?= cargo
ASSETS := target/assets

.PHONY: all assets install uninstall deb test clean bpf

all:
	$(CARGO) build --release --locked --bin cwreap

assets: all
	target/release/cwreap generate --out-dir $(ASSETS)

install: assets
	install -D -m 0755 target/release/cwreap $(DESTDIR)$(PREFIX)/bin/cwreap
	install -D -m 0644 $(ASSETS)/cwreap.8 $(DESTDIR)$(PREFIX)/share/man/man8/cwreap.8
	install -D -m 0644 $(ASSETS)/cwreap.yaml.5 $(DESTDIR)$(PREFIX)/share/man/man5/cwreap.yaml.5
	install -D -m 0644 $(ASSETS)/cwreap.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/cwreap
	install -D -m 0644 $(ASSETS)/_cwreap $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_cwreap
	install -D -m 0644 $(ASSETS)/cwreap.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/cwreap.fish
	sed 's|/usr/bin/cwreap|$(PREFIX)/bin/cwreap|' systemd/cwreap.service > $(ASSETS)/cwreap.service
	install -D -m 0644 $(ASSETS)/cwreap.service $(DESTDIR)$(UNITDIR)/cwreap.service
	@# Opt-in drop-ins (containers, destroy, escalate): copied, never enabled.
	for f in systemd/drop-ins/*.conf; do \
		install -D -m 0644 $$f $(DESTDIR)$(PREFIX)/share/cwreap/drop-ins/$$(basename $$f); \
	done
	install -D -m 0644 config/logrotate/cwreap $(DESTDIR)$(SYSCONFDIR)/logrotate.d/cwreap
	@# Never overwrite a policy an operator already edited.
	test -e $(DESTDIR)$(SYSCONFDIR)/cwreap/cwreap.yaml || \
		install -D -m 0600 config/cwreap.yaml $(DESTDIR)$(SYSCONFDIR)/cwreap/cwreap.yaml

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/cwreap $(DESTDIR)$(PREFIX)/share/man/man8/cwreap.8 \
		$(DESTDIR)$(PREFIX)/share/man/man5/cwreap.yaml.5 \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions/cwreap \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions/_cwreap \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/cwreap.fish \
		$(DESTDIR)$(UNITDIR)/cwreap.service \
		$(DESTDIR)$(SYSCONFDIR)/logrotate.d/cwreap
	rm -rf $(DESTDIR)$(PREFIX)/share/cwreap/drop-ins

deb: assets
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

clean:
	$(CARGO) clean

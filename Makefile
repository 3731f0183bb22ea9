# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install qemu fio qemu10 test test-packaging demo bench fuzz faults lint clean screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# (setuptools' notice about an editable install of a flat layout is silenced: qdebug/ is the package)
$(STAMP): $(BIN)/python pyproject.toml build_hooks/backend.py build_hooks/native_build.py
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -e '.[test,native,dask]'
	touch $(STAMP)

# Bytecode compiled ahead, as pip does for an installed package: where PYTHONDONTWRITEBYTECODE
# is set, every run would otherwise compile qdebug's source again (~0.1 s). Only changed files.
# Then the write engine's hot modules compiled by mypyc (qdebug/native.py; ~1 minute, only when
# their source changed; without a C compiler qdebug runs as pure Python, and says so here).
install: $(STAMP)
	$(BIN)/python -m compileall -q qdebug
	$(BIN)/python -m qdebug.native build

# QEMU 7.2's qemu-img / qemu-io are the test oracle. Installed with apt-get when we are root;
# in CI (CI=true) a missing QEMU fails the run instead of skipping the differential tests.
qemu:
	@if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing qemu-utils with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null; \
	  else \
	    echo "qemu-img/qemu-io not found: install Debian's qemu-utils (sudo apt-get install qemu-utils);"; \
	    echo "differential tests against QEMU will be skipped outside CI"; \
	  fi; \
	fi
	@if [ "$$CI" = "true" ] && ! command -v qemu-img >/dev/null 2>&1; then \
	  echo "CI=true and qemu-img is missing: refusing to skip the differential tests"; exit 1; fi
	@command -v qemu-img >/dev/null 2>&1 && qemu-img --version | head -1 || true

# fio makes the real workloads (iologs) the trace-import tests replay; installed like QEMU, and in
# CI a missing fio fails the run.
fio:
	@if ! command -v fio >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing fio with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; \
	  else \
	    echo "fio not found: install Debian's fio (sudo apt-get install fio); the fio import tests will be skipped outside CI"; \
	  fi; \
	fi
	@if [ "$$CI" = "true" ] && ! command -v fio >/dev/null 2>&1; then \
	  echo "CI=true and fio is missing: refusing to skip the fio import tests"; exit 1; fi
	@command -v fio >/dev/null 2>&1 && fio --version || true

# QEMU 10.0.2 unpacked beside the installed 7.2 (not installed): the known-bug signatures name the
# QEMU versions measured to produce them; `QDEBUG_QEMU10=$(CURDIR)/.qemu10/root make test` runs
# their QEMU-made cases against 10.0.2 too. The Debian mirror is the one apt already uses.
QEMU10 := .qemu10
qemu10:
	@mirror=$$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1); \
	test -n "$$mirror" || { echo "no Debian mirror found in /etc/apt/sources.list.d/debian.sources"; exit 1; }; \
	mkdir -p $(QEMU10)/lists/partial && \
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $$mirror bookworm-backports main" \
	  > $(QEMU10)/sources.list && \
	opts="-o Dir::Etc::sourcelist=$(CURDIR)/$(QEMU10)/sources.list -o Dir::Etc::sourceparts=- \
	  -o Dir::State::Lists=$(CURDIR)/$(QEMU10)/lists -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache="; \
	apt-get $$opts update -qq && cd $(QEMU10) && apt-get $$opts download -qq qemu-utils/bookworm-backports && \
	dpkg-deb -x qemu-utils_*.deb root && root/usr/bin/qemu-img --version | head -1
	@echo "QDEBUG_QEMU10=$(CURDIR)/$(QEMU10)/root"

# lint-imports: the layering contracts in pyproject.toml (engine below trace below tui/cli, and
# inside the engine format < file < read < write < check).
test: install qemu fio
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# pip users: the wheel carries the compiled engine; a fresh venv installs and runs it (~2 minutes,
# also part of `make test` when CI=true).
test-packaging: install
	QDEBUG_PACKAGING_TEST=1 $(BIN)/python -m pytest -p no:xdist tests/test_packaging.py $(PYTEST_ARGS)

demo: install
	$(BIN)/qdebug demo

# SVG (and PNG where rsvg-convert is installed) of the debugger's main states on the demo.
screenshots: install
	TEXTUAL_ANIMATIONS=none $(BIN)/python -m qdebug.tui.screenshots screenshots

bench: install qemu
	$(BIN)/python -m pytest benchmarks -p no:xdist --benchmark-columns=min,median,max --benchmark-sort=name -s $(PYTEST_ARGS)

fuzz: install
	QDEBUG_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -n 2 -m slow tests/test_fuzz.py $(PYTEST_ARGS)

# The long kill campaign: `qdebug replay` killed at random points (QDEBUG_FAULTS_ROUNDS, 300 by
# default), a foreign qemu-io write, recovery; prints "N kills: N consistent, 0 lost".
faults: install qemu
	QDEBUG_FAULTS_ROUNDS=$${QDEBUG_FAULTS_ROUNDS:-300} $(BIN)/python -m tests.faults.campaign

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks qdebug/_native $(QEMU10)

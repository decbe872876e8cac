# The make targets are the interface: install, run, test, lint, proto, bench, soak.
# Every target installs what it needs and can run by itself on a fresh Debian machine (root).

VENV      := .venv
PY        := $(VENV)/bin/python
# Debian's interpreter (python3-venv below), not whatever `python3` the PATH finds first:
# it is built with PGO and LTO and links libpython statically (docs/benchmarks.md).
PYTHON    := /usr/bin/python3
DEB_PKGS  := busybox-static containerd runc docker-registry libseccomp2 libarchive13 tini \
             iproute2 iptables apache2-utils openssl procps util-linux python3-venv strace \
             golang-github-containerd-containerd-dev golang-github-containerd-cgroups-dev
STAMP     := $(VENV)/.installed

.PHONY: install deb run test lint proto proto-check bench soak clean

install: deb $(STAMP)
	$(PY) -m compileall -q runtimed shimd ctl  # PYTHONDONTWRITEBYTECODE=1 here: else every start recompiles

# Debian packages the project and its tests use; apt-get runs only when one is missing.
deb:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml Makefile | deb  # deb first even under -j: it installs $(PYTHON)
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat  # a path entry, not an import hook: ~10 ms less per ctl start
	touch $(STAMP)

run: install
	$(PY) -m runtimed.demo

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check runtimed shimd ctl tests bench proto

proto: install
	$(PY) proto/generate.py

proto-check: install
	$(PY) proto/generate.py --check

bench: install
	$(PY) -m bench

soak: install
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) .pytest_cache

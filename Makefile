# `make test` sets up everything on a fresh Debian/Ubuntu machine (runsc, uidmap, Docker
# with the runsc runtime, a virtualenv) and runs the whole suite against the real things.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := uidmap python3 docker.io
# Debian's chromium: the browser test drives JupyterLab in it (Playwright, no browser download).
APT_PACKAGES += chromium
# debootstrap: tests/test_image.py builds the single-user image's base (scripts/build_image.py).
APT_PACKAGES += debootstrap

.PHONY: test test-unit system venv lint bench doctor clean

# dockerd is started for the tests if none answers, and stopped again afterwards.
test: system venv lint
ifeq ($(SUDO),)
	$(PYTHON) scripts/with_dockerd.py -- $(PY) -m pytest
else
	$(SUDO) $(PYTHON) scripts/with_dockerd.py --start-only
	$(PY) -m pytest
endif

# The rules alone (fallback, never twice, exit statuses, the agent's wire, the layers, the
# egress proxy, the protected paths, request checks), with fakes: seconds, no runsc, Docker,
# daemon or root needed (tests/conftest.py's leak check contacts no Docker there). Four
# processes (pytest-xdist): most of the time is waiting; without nbval's plugin, whose
# import (nbformat) costs each of them 2 s. `make test` runs them too.
test-unit: venv
	$(PY) -m pytest -q -p no:nbval -n 4 tests/unit

# runsc (Debian: bookworm-backports, else the verified official release), registered as a
# Docker runtime; uidmap for ordinary users; /usr/bin/python3 runs the suite as one.
system:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || \
	  missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null; then \
	  echo "installing:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing || \
	  { $(SUDO) apt-get update -q && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; }; \
	fi
	$(SUDO) $(PYTHON) scripts/install_gvisor.py --docker

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

lint: venv
	$(PY) -m ruff check gvisor_magic tests scripts benchmarks

# Figures, not tests: real programs and peers, latency of every backend, streaming
# throughput, density, the gVisor kernel against a normal one and through a real server,
# held writes, and what the MCP server adds to a command.
bench: system venv
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PYTHON) scripts/with_dockerd.py -- sh -c '$(PY) benchmarks/programs.py && \
	  $(PY) benchmarks/latency.py && \
	  $(PY) benchmarks/throughput.py && $(PY) benchmarks/density.py && \
	  $(PY) benchmarks/kernel.py && $(PY) benchmarks/kernel_server.py && \
	  $(PY) benchmarks/writes.py && $(PY) benchmarks/mcp_overhead.py'

# The single-user image of deploy/kubernetes/Dockerfile, built here (no registry needed):
# a debootstrapped Debian base with the docker-stacks contract, then the Dockerfile on it.
.PHONY: image
image: system venv
	$(SUDO) $(PYTHON) scripts/with_dockerd.py --start-only
	$(SUDO) $(PY) scripts/build_image.py

# The hostile-probe suite and the fault tests, as a table: probe x backend -> blocked / LEAKED.
.PHONY: security-report
security-report: system venv
ifeq ($(SUDO),)
	$(PYTHON) scripts/with_dockerd.py -- $(PY) scripts/security_report.py
else
	$(SUDO) $(PYTHON) scripts/with_dockerd.py --start-only
	$(PY) scripts/security_report.py
endif

# The main job: JupyterLab on 127.0.0.1 with gvisor_magic and notebooks/ open; prints the
# URL (with its token) and runs until Ctrl-C, which also stops its kernels and sandboxes.
.PHONY: lab
lab: system venv
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[lab]'
	$(PY) scripts/lab.py

doctor: venv
	$(VENV)/bin/gvisor-magic doctor

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache tests/artifacts

# The hosted path: a real JupyterHub (tests/e2e) and the Kubernetes files (deploy/).
# configurable-http-proxy comes from npm into .e2e/ (node/npm from Debian if missing).
E2E_DIR := .e2e
CHP     := $(E2E_DIR)/node_modules/.bin/configurable-http-proxy

.PHONY: test-e2e e2e-deps

test: e2e-deps

e2e-deps: $(VENV)/.installed-e2e $(CHP)

$(VENV)/.installed-e2e: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,e2e]'
	touch $@

$(CHP):
	@command -v npm >/dev/null || { $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm; }
	mkdir -p $(E2E_DIR)
	npm install --prefix $(E2E_DIR) --no-audit --no-fund --loglevel=error \
	  'configurable-http-proxy@>=4.6.1 <6'
	test -x $@ && touch $@

test-e2e: system e2e-deps
	$(PY) -m pytest tests/e2e tests/test_deploy_files.py

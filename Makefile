# `make test` sets up everything on a fresh Debian/Ubuntu machine (runsc, uidmap, a
# virtualenv) and runs the whole suite against the real runsc.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test system venv lint bench doctor clean

test: system venv lint
	$(PY) -m pytest

# runsc (Debian: bookworm-backports, else the verified official release) and uidmap;
# /usr/bin/python3 runs the suite again as an ordinary user.
system:
	$(SUDO) $(PYTHON) scripts/install_gvisor.py
	@command -v newuidmap >/dev/null && [ -x /usr/bin/python3 ] || \
	  (command -v apt-get >/dev/null && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	   apt-get install -y -q uidmap python3)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

lint: venv
	$(PY) -m ruff check gvisor_magic tests scripts benchmarks

bench: system venv
	$(PY) benchmarks/latency.py

doctor: venv
	$(VENV)/bin/gvisor-magic doctor

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache tests/artifacts

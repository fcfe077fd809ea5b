# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DEPS    := $(VENV)/.dependencies
STAMP   := $(VENV)/.installed
# Every source file and folder: a folder's time changes when a module is added or removed.
SOURCES := pyproject.toml README.md $(shell find server client shared_models -name __pycache__ \
	-prune -o \( -type d -o -name '*.py' \) -print 2>/dev/null)

.PHONY: install tools demo test test-all lint clean

# Without an NVIDIA GPU, pin the CPU wheel of torch first: letting pip resolve
# plain `torch` pulls a multi-GB CUDA build. With a GPU, take the CUDA build.
$(DEPS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q 'torch>=2.8'; \
	else \
		$(BIN)/python -m pip install -q torch==2.13.0; \
	fi
	$(BIN)/python -m pip install -q 'hatchling>=1.26'
	$(BIN)/python -m pip install -q --no-build-isolation '.[dev]'
	touch $(DEPS)

# medfed itself is installed from the wheel it ships as, not editable: the tests
# run what a hospital installs. Any change to a source file reinstalls it.
$(STAMP): $(DEPS) $(SOURCES)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation --force-reinstall .
	touch $(STAMP)

install: $(STAMP)

# The observability tests start a real Prometheus server and run promtool (the
# Debian package `prometheus`); the coordinator's proxy is nginx (the Debian package
# `nginx`, in /usr/sbin), which the proxy and deployment tests start for real; the PACS
# tests start a real Orthanc with its DICOMweb plugin (`orthanc`, `orthanc-dicomweb`).
tools:
	@missing=""; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	PATH="$$PATH:/usr/sbin:/usr/local/sbin" command -v nginx >/dev/null 2>&1 \
		|| missing="$$missing nginx"; \
	PATH="$$PATH:/usr/sbin:/usr/local/sbin" command -v Orthanc >/dev/null 2>&1 \
		|| missing="$$missing orthanc"; \
	[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "make test needs the Debian packages:$$missing (apt-get install$$missing)" >&2; \
			exit 1; \
		fi; \
	fi

demo: $(STAMP)
	$(BIN)/medfed simulate --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# The default run: every unit test and every drill (deployment, stop and resume, the
# front door, a lost or late hospital). `make test-all` adds the whole-run federations
# marked slow (each task family, bundles, cross-site, the quality and scale tables).
# ARGS picks what to run: make test ARGS=tests/server/test_cli.py (or ARGS="-k resume").
ARGS ?=
test: $(STAMP) tools
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP) tools
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache dist build

# imagefit: `make demo` trains on the built-in default, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install system data demo test test-fast lint bench-docs mutation clean

# torch and torchvision first, at the exact versions this machine holds as wheels, so that
# nothing that follows pulls another torch build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test,all]'
	touch $(STAMP)

install: $(STAMP)

# What the tests need beyond Python packages, from Debian when root on Debian: Fashion-MNIST,
# Chromium (report.html and the serve page, headless), a C++ compiler (torch.compile on the
# CPU) and PostgreSQL (a study shared by two tune commands; the test starts its own server).
# A failed install stops make; where nothing can be installed (not root, not Debian) the
# tests that need it skip with the reason, and under CI=true (.ci/run) a skip fails.
DATASET_NEEDED = $(if $(wildcard $(FASHION_MNIST)),,dataset-fashion-mnist)
SYSTEM_NEEDED = $(DATASET_NEEDED) $(if $(shell command -v chromium),,chromium) \
	$(if $(shell command -v g++),,g++) \
	$(if $(wildcard /usr/lib/postgresql/*/bin/initdb),,postgresql)

define apt_install
	@if [ -n "$(strip $(1))" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "make: installing $(strip $(1)) from Debian"; \
			(apt-get update -qq && apt-get install -y -qq $(1) >/dev/null) \
			|| { echo "make: could not install $(strip $(1)) with apt-get"; exit 1; }; \
		else \
			echo "make: $(strip $(1)) missing, and not installable here (not root on Debian): what needs it will skip"; \
		fi; \
	fi
endef

data:
	$(call apt_install,$(DATASET_NEEDED))

system:
	$(call apt_install,$(SYSTEM_NEEDED))

demo: install data
	@$(BIN)/imagefit fit builtin:fashion-mnist; status=$$?; \
	if [ $$status = 2 ]; then \
		echo "make demo: Fashion-MNIST cannot be had here; training on builtin:digits instead"; \
		$(BIN)/imagefit fit builtin:digits; \
	else exit $$status; fi

# A worker per core (pytest-xdist), each on one thread, handed whole files so that a module's
# shared fixtures are built once, the longest first (tests/conftest.py): 17.9 minutes
# against 27 one after another on 2 AVX2 cores.
# --durations: the slowest tests, named at the end of each run (the suite's time is watched).
# Bytecode is written even where the environment says not to (PYTHONDONTWRITEBYTECODE): the
# commands the tests start import imagefit's modules from source each time otherwise (9.1 s
# of CPU to import imagefit.api against 8.4 s with its bytecode, AMD EPYC).
PARALLEL = -n auto --dist loadfile --no-loadscope-reorder
test: install system
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q $(PARALLEL) --durations=30

# The edit-test loop: the tests not marked slow (under 3 minutes on 2 cores); `make test`
# and CI run them all.
test-fast: install system
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q $(PARALLEL) -m "not slow"

lint: install
	$(BIN)/ruff check src tests bench

bench-docs: install
	$(BIN)/python bench/tables.py

mutation: install
	$(BIN)/python bench/mutation_check.py

clean:
	rm -rf $(VENV) runs .pytest_cache

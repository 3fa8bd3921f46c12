# imagefit: `make demo` trains on the built-in default, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install data browser demo test lint bench-docs clean

# torch and torchvision first, at the exact versions this machine holds as wheels, so that
# nothing that follows pulls another torch build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's package when we are root on Debian; otherwise imagefit looks in
# $$IMAGEFIT_DATA or downloads it when the network allows.
data:
	@if [ ! -d $(FASHION_MNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "make: could not install dataset-fashion-mnist; tests that need it will skip"; \
	fi

# Chromium renders report.html in the report tests (headless); installed from Debian when
# missing and we are root, as the data is.
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "make: could not install chromium; the browser tests will skip"; \
	fi

demo: install data
	@$(BIN)/imagefit fit builtin:fashion-mnist; status=$$?; \
	if [ $$status = 2 ]; then \
		echo "make demo: Fashion-MNIST cannot be had here; training on builtin:digits instead"; \
		$(BIN)/imagefit fit builtin:digits; \
	else exit $$status; fi

test: install data browser
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench

bench-docs: install
	$(BIN)/python bench/tables.py

clean:
	rm -rf $(VENV) runs .pytest_cache

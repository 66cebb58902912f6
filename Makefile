# Every target creates .venv from the pinned constraints when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench evidence clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) scripts/bench_expand.py

# Training evidence for every growth path (about 30 minutes on 2 CPU cores): docs/growth_evidence.{png,json,md}
evidence: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[evidence]'
	$(PY) scripts/growth_evidence.py --out docs/growth_evidence

clean:
	rm -rf $(VENV) .cache

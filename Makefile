# make demo: one job on the embedded tiny model, prints where the image went.
# make test: the whole test suite. Both create the environment first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/cpu.txt | cksum | cut -d' ' -f1)

.PHONY: demo test env clean

env: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first (on local disk here), so no multi-GB CUDA build is pulled in.
	$(PY) -m pip install -q -c requirements/cpu.txt torch
	$(PY) -m pip install -q -c requirements/cpu.txt -e '.[test]'
	rm -f $(VENV)/.installed-*; touch $@

demo: $(STAMP)
	$(PY) -m app run '{"prompt": "a red sneaker on a beach", "seed": 7}'

# Two workers, one test file each at a time, so module-scoped fixtures are built once per file.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) outputs .pytest_cache

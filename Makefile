# The README's two commands. Torch comes first, pinned, so that pip never pulls a CUDA build
# on a CPU machine; a GPU user installs their CUDA torch first instead (see README).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-test demo test

install:
	$(PIP) torch==2.13.0
	$(PIP) -e .

install-test: install
	$(PIP) -e '.[test]'

demo: install
	paca-prof run --model llama3-8b --seq 4096

test: install-test
	$(PYTHON) -m pytest -q

# make demo: set up .venv (once) and train the default job (MergeMix on digits).
# make test: set up .venv with the test extras (once) and run the test suite.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup clean

# torch/torchvision first, pinned: the plain `torch` requirement could pull a multi-GB build.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mergemix train

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf output .pytest_cache

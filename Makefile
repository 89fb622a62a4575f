# The two commands of the README:
#   make demo   runs the main job end to end on ML-1M with the embedded defaults
#   make test   runs the test suite
# Both create the project-local virtual environment .venv on first use (scripts/bootstrap.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
ML1M ?= ../shared/data/ml-1m
ML100K ?= ../shared/data/ml-100k
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-all bench env clean docs
env:
	@bash scripts/bootstrap.sh

demo: env
	$(VENV)/bin/llmfeat demo --source $(ML1M) $(ARGS)

test: env
	LLMFEAT_ML100K=$(abspath $(ML100K)) LLMFEAT_ML1M=$(abspath $(ML1M)) $(PY) -m pytest -q -m "not slow"

test-all: env
	LLMFEAT_ML100K=$(abspath $(ML100K)) LLMFEAT_ML1M=$(abspath $(ML1M)) $(PY) -m pytest -q

bench: env
	$(VENV)/bin/llmfeat bench --source $(ML1M)

docs: env
	$(PY) -m llm_features.cli.reference --write docs/cli.md

clean:
	rm -rf feast_repo/data runs

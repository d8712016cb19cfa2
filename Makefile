# simkeeper: `make test` and `make demo` do all set-up on a fresh Debian/Raspberry Pi OS machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo lint bench deps mosquitto packaging-tools rabbitmq clean deb

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

deps: $(STAMP) mosquitto packaging-tools rabbitmq

# The MQTT tests and the demo need a mosquitto binary (the tests start their own broker).
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  echo "installing mosquitto with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq mosquitto mosquitto-clients; }

# The packaging tests run lintian on the built .deb and node on the polkit rule; the signing
# tests sign with node, and with jq and openssl from the shell; the dashboard's test drives a
# headless Chromium through chromedriver.
packaging-tools:
	@missing=; \
	command -v lintian >/dev/null 2>&1 || missing="$$missing lintian"; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs"; \
	command -v jq >/dev/null 2>&1 || missing="$$missing jq"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	test -z "$$missing" || { \
	  echo "installing$$missing with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO apt-get install -y -qq --no-install-recommends $$missing; }

# The broker tests run a RabbitMQ node of their own (its MQTT plugin) beside mosquitto. Only the
# package's files are needed: a service it fails to start in a container is not ours to run.
rabbitmq:
	@test -x /usr/lib/rabbitmq/bin/rabbitmq-server || { \
	  echo "installing rabbitmq-server with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO apt-get install -y -qq --no-install-recommends rabbitmq-server \
	    || test -x /usr/lib/rabbitmq/bin/rabbitmq-server; }

lint: $(STAMP)
	$(BIN)/ruff check agent drivers provisioning tests bench
	$(BIN)/mypy

test: deps lint
	$(BIN)/pytest -q

demo: deps
	$(BIN)/simkeeper demo

bench: deps
	$(BIN)/python -m bench

# The .deb for Debian bookworm / Raspberry Pi OS, into dist/: `ARCH=arm64 make deb` for a 64-bit
# Pi (wheels fetched for that platform). See packaging/README.md.
deb: $(STAMP)
	$(BIN)/python packaging/build_deb.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache

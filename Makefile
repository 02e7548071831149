# The two commands: `make demo` and `make test` (see README.md). Both create .venv and install the
# pinned stack (constraints.txt) on first use; later runs reuse it.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CUDA fbgemm-gpu wheel only loads where an NVIDIA driver is present.
FBGEMM := $(shell if nvidia-smi >/dev/null 2>&1; then echo fbgemm-gpu; else echo fbgemm-gpu-cpu; fi)
KAFKA_LIB := deploy/kafka/lib/.resolved
PYTEST_ARGS ?=

.PHONY: install demo test servers-up servers-down bench-storage tools proto

install: $(STAMP)

$(STAMP): constraints.txt setup.cfg pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q -c constraints.txt torch $(FBGEMM)
	$(VPY) -m pip install -q -c constraints.txt -e '.[test]'
	# torchrec declares the CUDA fbgemm-gpu wheel as a dependency: its real deps are installed above.
	$(VPY) -m pip install -q -c constraints.txt --no-deps torchrec
	# the stock OIP test client: --no-deps for the reason in constraints.txt
	$(VPY) -m pip install -q -c constraints.txt --no-deps tritonclient
	$(VPY) -c "import torchrec_hps; torchrec_hps.check_environment(verbose=True)"
	# fbgemm's compat-table warnings filtered in every process of the venv, whatever it imports first
	$(VPY) torchrec_hps/_env.py
	touch $(STAMP)

# Test servers: Redis from Debian's package, the Kafka broker from Maven Central (run with Java 17);
# promtool (Debian's prometheus package) checks the alert rules and the dashboard's expressions.
tools: $(KAFKA_LIB)
	@command -v redis-server >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server redis-tools; }
	@command -v promtool >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }
	@command -v java >/dev/null || { echo "Java 17 is needed to run the test Kafka broker (apt-get install openjdk-17-jre-headless)"; exit 1; }

$(KAFKA_LIB): deploy/kafka/pom.xml
	@command -v mvn >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q maven; }
	rm -rf deploy/kafka/lib
	mvn -q -B -f deploy/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=lib -DincludeScope=runtime
	touch $@

servers-up: $(STAMP) tools
	$(VPY) -m tests.servers up

servers-down:
	$(VPY) -m tests.servers down

# Starts the servers, runs pytest, stops the servers (also when pytest fails). pytest's exit 5
# (no tests collected) fails the target like any other non-zero exit.
test: $(STAMP) tools
	@$(VPY) -m tests.servers up || { $(VPY) -m tests.servers down; exit 1; }; \
	$(VPY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	$(VPY) -m tests.servers down; exit $$rc

demo: $(STAMP)
	$(VPY) -m apps.cli demo

# Stops the servers afterwards only if it started them (servers-up before it keeps them up).
bench-storage: $(STAMP) tools
	@was_up=$$($(VPY) -m tests.servers status >/dev/null 2>&1 && echo yes); \
	$(VPY) -m tests.servers up || exit 1; \
	$(VPY) -m apps.bench_storage $(BENCH_ARGS); rc=$$?; \
	[ "$$was_up" = yes ] || $(VPY) -m tests.servers down; exit $$rc

# Regenerates the Open Inference Protocol gRPC modules from the .proto (needs grpcio-tools); their
# descriptors go to a private pool so a process may also hold tritonclient (same package and names).
PROTO := torchrec_hps/serving/oip/grpc_predict_v2.proto
proto:
	$(VPY) -m pip install -q -c constraints.txt grpcio-tools
	$(VPY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. $(PROTO)
	sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/# A private pool (see the Makefile: make proto)\nDESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile(/' $(PROTO:.proto=_pb2.py)

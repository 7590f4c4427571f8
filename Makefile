# Fleet developer entry points. `make test` and `make demo` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck unit services venv demo demo-upgrade bench faults faults-cluster clean \
	guest-image test-qemu test-deploy demo-vm

# constraints.txt pins the dependency versions the tests ran with (CI and fresh clones alike).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

services:
	@bash deploy/dev/ensure-services.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The suite includes the real-guest tests (marker qemu, deselected from a bare `pytest`): the
# machine is made able to run them first (QEMU installed as root, the guest image built). When it
# cannot, a loud SKIPPED line and the tests skip with the reason, unless FLEET_QEMU_REQUIRED=1.
test: $(STAMP) services lint typecheck
	@bash deploy/dev/ensure-promtool.sh
	@$(QEMU_HOST)
	$(BIN)/pytest -q -rs -m 'not slow and not docker' $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

demo: $(STAMP) services
	$(BIN)/python -m conductor.tools.demo

demo-upgrade: $(STAMP) services
	$(BIN)/python -m conductor.tools.demo_upgrade

# The fault campaign (issue 13): every fault in turn under load, invariants after each; the
# quick form runs inside `make test` (tests/faults/test_campaign_quick.py). FAULTS_ARGS e.g.
# "--json campaign.json --logs var/campaign" or "--only broker".
# Then the three-node RabbitMQ cluster with quorum queues (issue 14): a node SIGKILLed under a
# boot storm and restarted (faults-cluster alone: about 2 minutes per variant).
faults: $(STAMP) services
	$(BIN)/python tests/faults/run_campaign.py $(FAULTS_ARGS)
	$(MAKE) faults-cluster

faults-cluster: $(STAMP)
	$(BIN)/pytest -m slow -s tests/faults/test_rabbit_cluster.py

# The deployments run for real (issue 17; docs/operations.md, "Tested deployments"), as root:
# the units of deploy/systemd/ under a real systemd booted in systemd-nspawn, against this
# machine's RabbitMQ and PostgreSQL (~3 min the first time, debootstrapping the cached Debian
# root, then ~70 s); then docker-compose.yml on a dockerd of the test's own, with local images
# built from that root (~3 min the first time, then 1.5-2.5 min). Both run even if the first fails.
# Exit 77 from a driver means this machine cannot run it: a loud SKIPPED line, status 0,
# unless FLEET_DEPLOY_REQUIRED=1.
test-deploy: $(STAMP) services
	@status=0; for part in systemd_nspawn compose_docker; do \
	  $(BIN)/python tests/deploy/$$part.py; rc=$$?; \
	  if [ $$rc = 77 ] && [ "$${FLEET_DEPLOY_REQUIRED:-0}" != 1 ]; then \
	    echo "test-deploy: $$part SKIPPED (this machine cannot run it; FLEET_DEPLOY_REQUIRED=1 makes that fail)"; \
	    rc=0; fi; \
	  [ $$rc = 0 ] || status=$$rc; \
	done; exit $$status

bench: $(STAMP) services
	$(BIN)/python bench/rpc.py --quick
	$(BIN)/python bench/objects.py --quick
	$(BIN)/python bench/scale.py --quick
	$(BIN)/python bench/cli.py --quick

# Real guests (docs/virt.md §9): QEMU and busybox-static from Debian's packages (installed when
# root), and the image the QEMU driver boots (Debian's kernel + busybox), cached in
# ~/.cache/fleet/images (FLEET_COMPUTE__QEMU_IMAGE_DIR); GUEST_IMAGE_ARGS=--force rebuilds.
QEMU_HOST = bash deploy/dev/ensure-qemu.sh $(BIN)/python $(GUEST_IMAGE_ARGS); rc=$$?; \
	if [ $$rc = 77 ] && [ "$${FLEET_QEMU_REQUIRED:-0}" != 1 ]; then \
	  echo "QEMU tests: SKIPPED (this machine cannot run guests; FLEET_QEMU_REQUIRED=1 makes that fail)"; \
	  rc=0; fi; [ $$rc = 0 ]

guest-image: $(STAMP)
	@$(QEMU_HOST)

test-qemu: $(STAMP) services
	@$(QEMU_HOST)
	$(BIN)/pytest -q -rs -m qemu tests/integration/virt_qemu $(PYTEST_ARGS)

# The demo with real guests: boot two, hot-plug a volume, live-migrate one (about a minute).
demo-vm: $(STAMP) services
	@bash deploy/dev/ensure-qemu.sh $(BIN)/python $(GUEST_IMAGE_ARGS)
	$(BIN)/python -m conductor.tools.demo_vm

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache

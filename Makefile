# The two commands a newcomer needs (see README.md). Both set up what they need first.
SHELL := /bin/bash
.ONESHELL:
.PHONY: demo test lint unit setup image

setup:
	@scripts/setup.sh >/dev/null

# The main job end to end: an SmtpRelay applied, its relay running, a mail relayed.
demo:
	@BIN=$$(scripts/setup.sh); export PATH="$$BIN:$$PATH"
	python -m scripts.demo $(DEMO_ARGS)

# The relay's image (mmdebstrap base + podman build of the Dockerfile) as an OCI archive,
# cached under ~/.cache/smtprelay/image and rebuilt when the sources change. Prints its path.
image:
	@BIN=$$(SMTPRELAY_SKIP_CLUSTER_BUILD=1 scripts/setup.sh); export PATH="$$BIN:$$PATH"
	python -m devcluster image

# Every test, plus the linters and type checker CI runs.
test:
	@BIN=$$(scripts/setup.sh); export PATH="$$BIN:$$PATH"
	set -x
	ruff check .
	ruff format --check .
	mypy
	lint-imports
	python -m pytest $(PYTEST_ARGS)

lint:
	@BIN=$$(SMTPRELAY_SKIP_CLUSTER_BUILD=1 scripts/setup.sh); export PATH="$$BIN:$$PATH"
	ruff check . && ruff format --check . && mypy && lint-imports

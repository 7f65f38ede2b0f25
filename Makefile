# `make serve`: set up .venv and serve SmolLM2 on 127.0.0.1:30000.
# `make test`: set up .venv and run the test suite (what CI runs).
.PHONY: setup serve test

.venv/.kiln-installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: .venv/.kiln-installed

serve: setup
	.venv/bin/kiln serve

test: setup
	.venv/bin/python -m pytest

# Two entry points (see README): `make demo` and `make test`. Both set up what
# they need themselves: Debian packages (when run as root and missing) and a
# virtual environment in .venv with the CPU build of torch.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO ?= demo
NPROCS ?= 2

.PHONY: demo test venv sysdeps clean

# Debian packages the tests use: mrtrix3 (reference tests), slurm-wlm + munge (a real
# one-node Slurm cluster, which tests/test_slurm.py starts with ci/setup-slurm.sh).
# One apt-get for whatever is missing; nothing when all are there.
sysdeps:
	@pkgs=""; \
	command -v dwidenoise >/dev/null 2>&1 || pkgs="$$pkgs mrtrix3"; \
	for c in slurmctld slurmd sinfo munged; do \
	  command -v $$c >/dev/null 2>&1 || { pkgs="$$pkgs slurm-wlm munge"; break; }; done; \
	if [ -n "$$pkgs" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null; \
	  else echo "note: not installed:$$pkgs (needs root: apt-get install$$pkgs); the tests that need them are skipped"; fi; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml requirements/constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c requirements/constraints-cpu.txt torch==2.13.0
	$(VENV)/bin/pip install -q -c requirements/constraints-cpu.txt -e '.[test,peft,fetch]'
	touch $@

venv: $(VENV)/.installed

test: sysdeps venv
	$(VENV)/bin/lint-imports --config .importlinter
	$(VENV)/bin/pytest -q -p no:cacheprovider -n 2 --dist loadfile tests

demo: venv
	rm -rf $(DEMO)
	$(VENV)/bin/bids_adhd simulate $(DEMO)/bids --subjects 20 --seed 11 --size demo
	$(VENV)/bin/bids_adhd $(DEMO)/bids $(DEMO)/out participant --pipeline fast --nprocs $(NPROCS) --work-dir $(DEMO)/work
	$(VENV)/bin/bids_adhd $(DEMO)/bids $(DEMO)/out group --pipeline fast
	@echo "Outputs: $(DEMO)/out  (per-subject reports: $(DEMO)/out/sub-*.html; group report: $(DEMO)/out/group/report.html)"

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info

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

sysdeps:
	@command -v dwidenoise >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mrtrix3 >/dev/null; \
	  else echo "note: mrtrix3 not installed (needs root: apt-get install mrtrix3); its reference tests will be skipped"; fi; }

$(VENV)/.installed: setup.cfg pyproject.toml requirements/constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c requirements/constraints-cpu.txt torch==2.13.0
	$(VENV)/bin/pip install -q -c requirements/constraints-cpu.txt -e '.[test,peft,fetch]'
	touch $@

venv: $(VENV)/.installed

test: sysdeps venv
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

demo: venv
	rm -rf $(DEMO)
	$(VENV)/bin/bids_adhd simulate $(DEMO)/bids --subjects 20 --seed 1 --size demo
	$(VENV)/bin/bids_adhd $(DEMO)/bids $(DEMO)/out participant --pipeline fast --nprocs $(NPROCS) --work-dir $(DEMO)/work
	$(VENV)/bin/bids_adhd $(DEMO)/bids $(DEMO)/out group --pipeline fast
	@echo "Outputs: $(DEMO)/out  (per-subject reports: $(DEMO)/out/sub-*.html; group report: $(DEMO)/out/group/report.html)"

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info

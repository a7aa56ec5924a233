# One command per job; each creates its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0

.PHONY: setup test chat bench clean

$(VENV)/.installed: pyproject.toml
	@# System packages on Debian/Ubuntu: OpenBLAS (fast CPU matmuls) and tmux (the chat smoke test).
	@if [ "$$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null && \
	    { [ ! -e $(OPENBLAS) ] || ! command -v tmux >/dev/null; }; then \
		echo "installing libopenblas0-pthread and tmux"; \
		apt-get install -y -q libopenblas0-pthread tmux >/dev/null 2>&1 || \
		sudo -n apt-get install -y -q libopenblas0-pthread tmux >/dev/null 2>&1 || \
		echo "note: could not install OpenBLAS/tmux; CPU runs will be slower and the tmux test skipped"; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

setup: $(VENV)/.installed

# MLX's Linux CPU wheels link a slow reference BLAS; OpenBLAS makes fp32 matmuls
# ~30x faster. Checked when the recipe runs, after setup may have installed it.
test: setup
	LD_PRELOAD=$$([ -e $(OPENBLAS) ] && echo $(OPENBLAS)) $(PY) -m pytest -q

chat: setup
	$(PY) -m pip install -q -e ".[default-model]"
	$(VENV)/bin/eagle3-mlx chat

bench: setup
	$(VENV)/bin/eagle3-mlx bench

clean:
	rm -rf $(VENV) build *.egg-info

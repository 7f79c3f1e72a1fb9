#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its test dependencies.
# torch is pinned to the CPU wheel these machines carry; on your own machine any torch>=2.4 works.
# tests/test_webui.py also needs Chromium: installed with apt-get when missing (as root, or
# through sudo without a password); otherwise this says how to install it. The same for
# PostgreSQL (tests/test_jobs_database.py starts a throwaway cluster with its initdb).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${DREAMBOOTH_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test]"

# apt_install PACKAGE WHAT_NEEDS_IT: Debian's package, as root or through sudo without a
# password; otherwise say how to install it.
apt_install() {
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
    elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
    else
        echo "bootstrap: $2 needs $1: install it (Debian: apt-get install $1)" >&2
    fi
}

# Playwright drives the system's Chromium (its own browser download is not used); set
# DREAMBOOTH_CHROMIUM to use another one.
if [ -z "${DREAMBOOTH_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    apt_install chromium tests/test_webui.py
fi
# tests/test_jobs_database.py starts a throwaway PostgreSQL cluster (Debian's initdb, pg_ctl).
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    apt_install postgresql tests/test_jobs_database.py
fi

#!/usr/bin/env bash
# Runs every carebus test, installing first whatever the tests need.
# Works on a fresh Debian machine with the Rust toolchain; needs root (or sudo) only
# when a system package is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

# Python clients used by the process-level tests live in a venv of the project's own.
if [ -f scripts/requirements-test.txt ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
  export CAREBUS_TEST_PYTHON="$PWD/.venv/bin/python"
fi

cargo test --workspace --locked "$@"

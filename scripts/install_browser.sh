#!/usr/bin/env bash
# Debian's chromium for the headless web-extension test (tests/e2e). Needs root (CI runs as root).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "[browser] chromium missing and not root: install Debian's 'chromium' to run the browser test" >&2
  exit 0
fi
echo "[browser] installing Debian chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
chromium --version

#!/bin/sh
# Installs Debian's Chromium for the browser tests (tests/browser/), which drive it with
# Playwright for Python through its executable_path: Playwright's own browser download needs
# the internet, and the system package is what an air-gapped CI can install.
#
# Idempotent and quick when Chromium is already there. Where it cannot install (not root, no
# apt-get) it says so and exits 0: the browser tests then skip and say why.
set -eu

if [ -x /usr/bin/chromium ]; then
    echo "browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "browser: not installing chromium (needs root); the browser tests will skip" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser: not installing chromium (needs apt-get); the browser tests will skip" >&2
    exit 0
fi

echo "browser: installing chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Fonts so that the page's text renders (and its screenshot is readable) on a bare machine.
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) installed"

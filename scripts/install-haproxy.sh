#!/bin/sh
# Installs Debian's HAProxy for the rolling-restart test (tests/service/test_rolling.py), which
# puts three service processes behind it on loopback ports, health-checked on the readiness route,
# as a load balancer or a Kubernetes Service does in production.
#
# Idempotent and quick when HAProxy is already there. Where it cannot install (not root, no
# apt-get) it says so and exits 0: the test then skips and says why.
set -eu

PATH="$PATH:/usr/sbin:/sbin"
if command -v haproxy >/dev/null 2>&1; then
    echo "haproxy: $(haproxy -v 2>/dev/null | head -n 1) already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "haproxy: not installing (needs root); the rolling-restart test will skip" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "haproxy: not installing (needs apt-get); the rolling-restart test will skip" >&2
    exit 0
fi

echo "haproxy: installing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends haproxy >/dev/null
# The package starts its own service on port 80 where an init system runs; the test needs only the binary.
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now haproxy >/dev/null 2>&1 || true
fi
echo "haproxy: $(haproxy -v 2>/dev/null | head -n 1) installed"

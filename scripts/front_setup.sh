#!/usr/bin/env bash
# HAProxy, for the server's optional front (`python -m server --front-limit N`, server/runtime/front.py), which
# queues a few plain calls past its limit and refuses the rest in C. scripts/test.sh runs this too, so
# tests/server/runtime/test_front.py runs. Idempotent, and it never prompts: as root it runs `apt-get install haproxy`
# (Debian/Ubuntu; `brew install haproxy` on macOS); otherwise it tries `sudo -n` (no password prompt).
# Where it cannot install, it prints one line naming what it skipped and succeeds: the front's tests
# then skip with that reason (with CI=true they fail), and the server without --front-limit needs none.
# GENSERVE_FRONT_HAPROXY (the server's --front-haproxy) names the program to look for.
set -euo pipefail
exec </dev/null  # nothing below may wait for an answer
found() {
  if [ -n "${GENSERVE_FRONT_HAPROXY:-}" ]; then command -v "$GENSERVE_FRONT_HAPROXY" 2>/dev/null; return; fi
  command -v haproxy 2>/dev/null || { [ -x /usr/sbin/haproxy ] && echo /usr/sbin/haproxy; }
}
skip() {
  echo "front_setup: skipped installing haproxy ($1): python -m server --front-limit and tests/server/runtime/test_front.py need it" >&2
  exit 0
}
if where=$(found); then
  echo "front_setup: haproxy is installed ($where)"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1 || ! sudo -n true 2>/dev/null; then
      skip "not root, and sudo would ask for a password; as root: apt-get install haproxy"
    fi
    SUDO=(sudo -n)
  fi
  # policy-rc.d: the package must not start haproxy as a system service; the front runs its own
  if [ "$(id -u)" -eq 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  if "${SUDO[@]}" apt-get install -y -q haproxy >/dev/null 2>&1 \
    || { "${SUDO[@]}" apt-get update -q >/dev/null 2>&1 && "${SUDO[@]}" apt-get install -y -q haproxy >/dev/null 2>&1; }; then
    echo "front_setup: installed haproxy with apt-get"
    exit 0
  fi
  skip "apt-get install haproxy failed"
elif command -v brew >/dev/null 2>&1; then
  brew install haproxy >/dev/null && { echo "front_setup: installed haproxy with brew"; exit 0; }
  skip "brew install haproxy failed"
fi
skip "no apt-get or brew to install it with"

#!/usr/bin/env bash
# HAProxy, for the server's optional front (`python -m server --front-limit N`, server/front.py), which
# queues a few plain calls past its limit and refuses the rest in C. scripts/test.sh runs this too, so
# tests/test_front.py runs. Idempotent. Where no package manager can install it, it says so and
# succeeds: the front's tests then skip (with CI=true they fail), and the server without --front-limit
# needs no HAProxy.
set -euo pipefail
if command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; then
  echo "front_setup: haproxy is installed ($( (command -v haproxy || echo /usr/sbin/haproxy) | head -1))"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
  # policy-rc.d: the package must not start haproxy as a system service; the front runs its own
  if [ -z "$SUDO" ] && [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && trap 'rm -f /usr/sbin/policy-rc.d' EXIT; fi
  if $SUDO apt-get install -y -q haproxy >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy >/dev/null; }; then
    echo "front_setup: installed haproxy"
    exit 0
  fi
elif command -v brew >/dev/null 2>&1; then
  brew install haproxy && exit 0
fi
echo "front_setup: could not install haproxy: --front-limit and tests/test_front.py need it (Debian: apt-get install haproxy)" >&2
exit 0

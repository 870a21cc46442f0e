#!/usr/bin/env bash
# System packages the tests need beyond pip: chromium, for tests/test_serve.py (the web demo
# driven in a headless browser). Installed with apt-get when this machine allows it (root, or
# passwordless sudo); otherwise this says why not and that test skips. Never fails the command
# it starts.
set -uo pipefail
skip() { echo "system-deps: $1; chromium not installed, tests/test_serve.py will skip"; exit 0; }
if command -v chromium >/dev/null 2>&1; then
  echo "system-deps: $(command -v chromium) is already installed"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || skip "no apt-get (not a Debian/Ubuntu machine)"
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  skip "not root and sudo asks for a password"
fi
"${as_root[@]}" apt-get update -qq || skip "apt-get update failed"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  chromium || skip "apt-get install chromium failed"
command -v chromium >/dev/null 2>&1 || skip "apt-get ran, yet no chromium on PATH"
echo "system-deps: installed $(command -v chromium)"

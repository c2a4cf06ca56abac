#!/bin/sh
# tests/test_compare.py renders leaderboard.html in headless Chromium; install Debian's `chromium`
# when it is missing and apt-get is there. Never fails `make test` itself: without a browser the
# test fails with a message (or is skipped with VITDISTILL_SKIP_BROWSER=1).
command -v chromium >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
	echo "ensure-chromium: no chromium and no apt-get; install Chromium or set VITDISTILL_SKIP_BROWSER=1" >&2
	exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
echo "ensure-chromium: installing chromium with apt-get" >&2
{ $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } ||
	echo "ensure-chromium: apt-get could not install chromium; the browser test will say so" >&2
exit 0

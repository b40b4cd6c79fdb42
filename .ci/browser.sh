#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the web-page test (tests/api/test_web_page.py drives it
# through Python playwright with executable_path=/usr/bin/chromium; no browser is ever downloaded).
# Idempotent and quiet: does nothing when chromium is already there.
set -eu
CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser: $CHROMIUM is missing and apt-get is not available to install it" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "browser: installing chromium (Debian package)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
if ! [ -x "$CHROMIUM" ]; then
    echo "browser: chromium did not install to $CHROMIUM" >&2
    exit 1
fi
echo "browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium installed)"

#!/usr/bin/env bash
# Install the headless browser the annotation page's end-to-end test drives
# (Debian's chromium + chromium-driver; Selenium uses the system browser, no downloads).
# Idempotent: does nothing when /usr/bin/chromedriver is already there. Run as root.
set -euo pipefail

if [ -x /usr/bin/chromedriver ]; then
    echo "browser.sh: chromedriver already installed" >&2
    exit 0
fi
echo "browser.sh: installing chromium and chromium-driver (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
/usr/bin/chromedriver --version >&2

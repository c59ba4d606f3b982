#!/bin/sh
# Headless Chromium + chromedriver for the dashboard's browser test
# (tests/integration/test_dashboard_browser.py). Idempotent: does nothing when both are on PATH.
# Installs the Debian/Ubuntu packages `chromium` and `chromium-driver` with apt-get, as root or
# through passwordless sudo (apt-get update only when the install fails for want of package
# lists). Anywhere else it says why it cannot and exits 0: the test then skips, saying how to
# install them.
set -eu

PACKAGES="chromium chromium-driver"

say() { printf 'install-browser: %s\n' "$*"; }

find_browser() {
    for name in chromium chromium-browser google-chrome; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

installed() {
    browser=$(find_browser) && driver=$(command -v chromedriver 2>/dev/null)
}

version() { "$1" --version 2>/dev/null || echo "version unknown"; }

if installed; then
    say "already installed: $browser ($(version "$browser")), $driver ($(version "$driver"))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    say "cannot install: no apt-get here; install Chromium and a matching chromedriver yourself"
    say "(the browser test skips until both are on PATH)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"
else
    say "cannot install: not root and no passwordless sudo; as root, run:"
    say "  apt-get install -y --no-install-recommends $PACKAGES"
    say "(the browser test skips until both are on PATH)"
    exit 0
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# apt-get install, its output shown and kept in $log -> its exit status
apt_install() {
    status=0
    # shellcheck disable=SC2086 # $as_root and $PACKAGES split into words on purpose
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PACKAGES \
        >"$log" 2>&1 || status=$?
    cat "$log"
    return "$status"
}

say "installing $PACKAGES with apt-get${as_root:+ (through sudo)}"
if ! apt_install; then
    if grep -Eq "Unable to locate package|has no installation candidate|Failed to fetch" "$log"; then
        say "the package lists are missing or stale: apt-get update, then once more"
        $as_root apt-get update
        apt_install
    else
        say "apt-get install failed (see above)" >&2
        exit 1
    fi
fi

if installed; then
    say "installed: $browser ($(version "$browser")), $driver ($(version "$driver"))"
else
    say "apt-get finished but chromium / chromedriver are still not on PATH" >&2
    exit 1
fi

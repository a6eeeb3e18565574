#!/usr/bin/env bash
# Render an nnfiltermatch report (or any local HTML file) in headless Chromium and save a PNG screenshot, to check
# that the page displays in a real browser. No network, no GPU, a throw-away profile.
#
# Usage: scripts/screenshot_report.sh REPORT.html [OUT.png] [WIDTHxHEIGHT]
#   default OUT.png: REPORT.png beside the HTML; default size 1400x3000.
# Chromium: Debian/Ubuntu `apt-get install -y chromium` (or set CHROMIUM=/path/to/chrome).
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
    echo "usage: $0 REPORT.html [OUT.png] [WIDTHxHEIGHT]" >&2
    exit 2
fi
html=$(realpath "$1")
out=$(realpath -m "${2:-${html%.*}.png}")
size=${3:-1400x3000}
browser=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [[ -z "$browser" ]]; then
    echo "no chromium found: apt-get install -y chromium, or set CHROMIUM" >&2
    exit 3
fi
if [[ ! -f "$html" ]]; then
    echo "$html does not exist" >&2
    exit 2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
rm -f "$out"
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$out" --window-size="${size/x/,}" "file://$html" >/dev/null 2>&1 || true
if [[ ! -s "$out" ]]; then
    echo "chromium wrote no screenshot to $out" >&2
    exit 1
fi
echo "$out"

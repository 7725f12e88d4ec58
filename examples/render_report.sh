#!/usr/bin/env bash
# bash examples/render_report.sh RUN_DIR [OUT.png]
#
# Writes RUN_DIR/report.html with `suder report` and screenshots it in headless Chromium (Debian: `apt-get install
# -y chromium`), the way a user sees it. Every network request is sent to a dead proxy, so the screenshot shows
# only what the page itself holds. HEIGHT (default 2600) sets how much of the page is captured.
set -euo pipefail
run=${1:?usage: bash examples/render_report.sh RUN_DIR [OUT.png]}
png=${2:-$run/report.png}
python -m suder report "$run"
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
    echo "No Chromium found: apt-get install -y chromium (Debian) or install Chrome." >&2
    exit 1
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
sandbox=()
[ "$(id -u)" = 0 ] && sandbox=(--no-sandbox)  # Chromium refuses to run as root with its sandbox
"$browser" --headless "${sandbox[@]}" --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --user-data-dir="$profile" --proxy-server=127.0.0.1:9 --hide-scrollbars \
    --window-size=1280,"${HEIGHT:-2600}" --screenshot="$(realpath -m "$png")" "file://$(realpath "$run/report.html")" \
    2>/dev/null
echo "Wrote $png"

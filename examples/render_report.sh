#!/usr/bin/env bash
# bash examples/render_report.sh RUN_DIR [RUN_DIR ...] [OUT.png]
#
# Writes the report with `suder report` and screenshots it in headless Chromium (Debian: `apt-get install -y
# chromium`), the way a user sees it. One run: RUN_DIR/report.html, shot to RUN_DIR/report.png by default.
# Several runs: the comparison page, written beside OUT.png (default compare.png) as OUT.html. Every network
# request is sent to a dead proxy, so the screenshot shows only what the page itself holds. HEIGHT (default 2600)
# sets how much of the page is captured.
set -euo pipefail
runs=()
png=
for arg in "$@"; do
    case $arg in
        *.png) png=$arg ;;
        *) runs+=("$arg") ;;
    esac
done
if [ ${#runs[@]} = 0 ]; then
    echo "usage: bash examples/render_report.sh RUN_DIR [RUN_DIR ...] [OUT.png]" >&2
    exit 2
fi
if [ ${#runs[@]} = 1 ]; then
    png=${png:-${runs[0]}/report.png}
    page=${runs[0]}/report.html
else
    png=${png:-compare.png}
    page=${png%.png}.html
fi
python -m suder report "${runs[@]}" --out "$page"
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
    --window-size=1280,"${HEIGHT:-2600}" --screenshot="$(realpath -m "$png")" "file://$(realpath "$page")" \
    2>/dev/null
echo "Wrote $png"

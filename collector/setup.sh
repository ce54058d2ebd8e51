#!/bin/sh
# What the collector's tests and page need on a Debian 12 machine, installed only when
# missing (safe to run again):
#   - moto's S3-compatible server (PyPI `moto[server]`), for the S3 backend tests;
#   - asciinema-player (npm) built files, copied to <workspace>/target/web-assets, where
#     the tests point `assets_dir` (a deployment points it at its own copy);
#   - chromium and chromium-driver (apt), for the page test.
# Nothing is committed or embedded: the collector serves the player from `assets_dir`.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

missing=""
for pkg in chromium chromium-driver openssl curl python3-pip nodejs npm; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $pkg"
done
# Node or pip may come from elsewhere than Debian's packages; they only have to run.
command -v npm >/dev/null 2>&1 && missing=$(echo "$missing" | sed 's/ nodejs//; s/ npm//')
python3 -m pip --version >/dev/null 2>&1 && missing=$(echo "$missing" | sed 's/ python3-pip//')
if [ -n "$missing" ]; then
    echo "setup: apt-get install$missing"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi

if ! command -v moto_server >/dev/null 2>&1; then
    echo "setup: pip install moto[server]"
    python3 -m pip install --quiet 'moto[server]' \
        || python3 -m pip install --quiet --break-system-packages 'moto[server]'
fi

assets="$root/target/web-assets"
if [ ! -f "$assets/asciinema-player.min.js" ] || [ ! -f "$assets/asciinema-player.css" ]; then
    echo "setup: npm install asciinema-player@3 -> $assets"
    npm_dir="$root/target/npm"
    mkdir -p "$npm_dir" "$assets"
    npm install --no-audit --no-fund --silent --prefix "$npm_dir" asciinema-player@3
    cp "$npm_dir"/node_modules/asciinema-player/dist/bundle/* "$assets/"
fi
echo "setup: collector ready (moto_server, chromium, chromedriver, $assets)"

#!/usr/bin/env bash
# Install Debian packages only when missing, running `apt-get update` at most once per boot.
set -euo pipefail
missing=()
for package in "$@"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
stamp=/tmp/.runnerhub-apt-updated
[ -f "$stamp" ] || { apt-get update -qq && touch "$stamp"; }
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"

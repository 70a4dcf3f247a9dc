#!/usr/bin/env bash
# Installs m1c's build and test dependencies from Debian's registry (Debian 12, as root). Skips apt
# when everything is already there, so repeated runs cost nothing.
set -euo pipefail
pkgs="build-essential cmake pkg-config libconfig-dev libcriterion-dev libopenblas-dev libopenblas-openmp-dev libjansson-dev fortunes fortunes-min"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "m1c: installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

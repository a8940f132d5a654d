#!/usr/bin/env bash
# Installs the Debian packages voicecall needs: `demo` (offline voice) or `test` (plus the real SIP peers).
set -euo pipefail
profile="${1:-demo}"
packages=(espeak-ng)
if [ "$profile" = test ]; then
  # chromium + chromium-driver: the console's browser test (selenium drives /usr/bin/chromedriver)
  # redis-server + nginx-light: the cluster tests (a real Redis; nginx in front of several nodes)
  # kamailio: SIP in front of several bridge nodes (tests/test_sip_kamailio.py, docker/kamailio/)
  packages+=(sox baresip-core sip-tester docker-compose chromium chromium-driver redis-server nginx-light kamailio)
fi
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "voicecall needs these packages, please install them: ${missing[*]}" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

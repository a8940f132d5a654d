#!/bin/bash
# Ask the running baresip (ctrl_tcp, netstring JSON) to dial; default: the bridge.
#   docker compose -f docker/compose.yaml exec softphone dial [sip:lab@bridge:5060]
set -euo pipefail
uri="${1:-sip:lab@bridge:5060}"
body="{\"command\":\"dial\",\"params\":\"${uri}\",\"token\":\"lab\"}"
exec 3<>/dev/tcp/127.0.0.1/4444
printf '%d:%s,' "${#body}" "$body" >&3
timeout 2 cat <&3 || true
echo

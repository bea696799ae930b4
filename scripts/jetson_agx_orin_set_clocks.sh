#!/usr/bin/env bash
# Pin an NVIDIA Jetson AGX Orin at its maximum power mode and clocks, so latency profiles are
# reproducible (the latency staircase moves with DVFS). Run on the Jetson, with sudo; never by tests.
#   sudo bash scripts/jetson_agx_orin_set_clocks.sh            # lock (saves the current settings first)
#   sudo bash scripts/jetson_agx_orin_set_clocks.sh --restore  # back to what was saved
set -euo pipefail
saved=${POMT_CLOCKS_FILE:-/var/tmp/pomt_jetson_clocks.conf}
command -v jetson_clocks >/dev/null || { echo "jetson_clocks not found: is this a Jetson with JetPack?" >&2; exit 1; }
if [[ "${1:-}" == "--restore" ]]; then
  jetson_clocks --restore "$saved"
  echo "restored clocks from $saved"
  exit 0
fi
[[ -f "$saved" ]] || jetson_clocks --store "$saved"
nvpmodel -m 0        # MAXN: all CPU cores on, highest power budget
jetson_clocks        # CPU, GPU and memory (EMC) clocks pinned at their maximum
jetson_clocks --show

#!/usr/bin/env bash
# Pin an NVIDIA Jetson (AGX Orin, TX2, Xavier, Orin Nano/NX) at its maximum power mode and clocks,
# so latency profiles are reproducible (the latency staircase moves with DVFS). Run on the Jetson,
# with sudo; never run by tests.
#   sudo bash scripts/jetson_set_clocks.sh            # lock (saves the current settings first)
#   sudo bash scripts/jetson_set_clocks.sh --restore  # back to what was saved
# Mode 0 is MAXN on the AGX Orin and the TX2 (on other boards check `nvpmodel -p --verbose`;
# POMT_NVPMODEL=N picks another mode).
set -euo pipefail
saved=${POMT_CLOCKS_FILE:-/var/tmp/pomt_jetson_clocks.conf}
command -v jetson_clocks >/dev/null || { echo "jetson_clocks not found: is this a Jetson with JetPack?" >&2; exit 1; }
if [[ "${1:-}" == "--restore" ]]; then
  jetson_clocks --restore "$saved"
  echo "restored clocks from $saved"
  exit 0
fi
[[ -f "$saved" ]] || jetson_clocks --store "$saved"
echo "board: $(tr -d '\0' </proc/device-tree/model 2>/dev/null || echo unknown)"
nvpmodel -m "${POMT_NVPMODEL:-0}"   # MAXN: all CPU cores on, highest power budget
jetson_clocks        # CPU, GPU and memory (EMC) clocks pinned at their maximum
jetson_clocks --show

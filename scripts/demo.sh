#!/usr/bin/env bash
# The main job: run a VM with real devices. On a machine without ACRN it uses the embedded
# backend. Sets up what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v '^WARNING' || true
exec python3 -m devicemodel --hv sim -m 256M -s 0:0,hostbridge "${@:-demo}"

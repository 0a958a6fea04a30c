#!/usr/bin/env bash
# Installs what the tests need (Debian packages, the Python package with its test extras),
# then runs ruff and the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(gcc libc6-dev linux-libc-dev pciutils acpica-tools qemu-system-x86 qemu-utils
              busybox-static cpio kmod iproute2 systemd e2fsprogs shellcheck debootstrap
              xorriso)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING' || true
python3 -m ruff check devicemodel tests bench
exec python3 -m pytest "$@"

#!/usr/bin/env bash
# Installs the Debian packages Sluice's build, tests and demo need. Idempotent and quiet:
# a no-op when everything is present. Targets Debian 12 (bookworm): QEMU 7.2, libvirt 9.0.
set -euo pipefail

PKGS=(
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  qemu-system-x86 qemu-utils qemu-block-extra libnbd-bin nbdkit pkg-config
  busybox-static genisoimage gcc libc6-dev openssl openssh-server curl
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

# Machine images may carry qemu-utils from bookworm-backports (10.x); the stack we test
# is bookworm's QEMU 7.2, and qemu-system-x86 7.2 cannot coexist with a newer qemu-utils.
qemu_utils_ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
downgrade=()
if [[ "$qemu_utils_ver" == *bpo* ]]; then
  downgrade=(qemu-utils/bookworm qemu-block-extra/bookworm)
fi

if [[ ${#missing[@]} -eq 0 && ${#downgrade[@]} -eq 0 ]]; then
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "deps: missing packages: ${missing[*]} ${downgrade[*]}; run 'make deps' as root" >&2
  exit 1
fi

echo "deps: installing ${missing[*]} ${downgrade[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# qemu-utils/qemu-block-extra pinned to bookworm when a backport is installed.
install=()
for p in "${missing[@]}"; do
  case "$p" in
    qemu-utils|qemu-block-extra) [[ ${#downgrade[@]} -gt 0 ]] || install+=("$p") ;;
    *) install+=("$p") ;;
  esac
done
apt-get install -y -qq --allow-downgrades --no-install-recommends \
  "${install[@]}" "${downgrade[@]}" >/dev/null

#!/usr/bin/env bash
# Builds the tiny test guest from Debian packages into OUTDIR:
#   OUTDIR/vmlinuz     Debian's cloud kernel (linux-image-cloud-amd64's versioned package)
#   OUTDIR/initrd.img  busybox-static + virtio modules + sluice-agent (+ qemu-ga and its libs)
#   OUTDIR/guest.info  what went in (package versions, qga=yes|no)
# Cached: rebuilt only when an input changes (this script, init, agent.c, package versions).
# Quiet on success; on failure prints the build log. Needs root only to download packages.
set -euo pipefail

OUT=${1:?usage: build.sh OUTDIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/build.log"

kernel_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

# Candidate versions of the packages we download, looked up once (apt-cache is slow).
declare -A CANDIDATE=()
load_candidates() {
  local pkg="" line
  while IFS= read -r line; do
    case "$line" in
      [!\ ]*:) pkg=${line%:} ;;
      *Candidate:*) CANDIDATE[$pkg]=${line##* } ;;
    esac
  done < <(apt-cache policy "$@" 2>/dev/null)
}
candidate() { echo "${CANDIDATE[$1]:-unknown}"; }

installed() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo none; }

KPKG=$(kernel_pkg)
if [[ -z "$KPKG" ]]; then
  # Package lists may be missing on a fresh machine.
  apt-get update -qq >/dev/null 2>&1 || true
  KPKG=$(kernel_pkg)
fi
if [[ -z "$KPKG" ]]; then
  echo "test-guest: cannot resolve linux-image-cloud-amd64 (apt-get update, then make deps)" >&2
  exit 1
fi

load_candidates "$KPKG" qemu-guest-agent

inputs() {
  sha256sum "$HERE/build.sh" "$HERE/init" "$HERE/agent.c" | awk '{ print $1 }'
  echo "$KPKG $(candidate "$KPKG")"
  echo "qemu-guest-agent $(candidate qemu-guest-agent)"
  echo "busybox-static $(installed busybox-static)"
  echo "libc6-dev $(installed libc6-dev)"
  echo "libglib2.0-0 $(installed libglib2.0-0)"
}
STAMP=$(inputs | sha256sum | awk '{ print $1 }')
if [[ -f "$OUT/.stamp" && "$(cat "$OUT/.stamp")" == "$STAMP" &&
      -f "$OUT/vmlinuz" && -f "$OUT/initrd.img" ]]; then
  exit 0
fi

WORK="$OUT/.work"
rm -rf "$WORK"
mkdir -p "$WORK/deb" "$WORK/root"
chmod 0777 "$WORK/deb" # apt-get download runs as user _apt where it can

fail() {
  echo "test-guest: build failed: $1 (log: $LOG)" >&2
  tail -n 40 "$LOG" >&2 || true
  exit 1
}

# Copies a dynamically linked binary's libraries and loader into the initramfs root.
copy_libs() {
  local bin=$1 root=$2 lib
  ldd "$bin" | awk '/=> \// { print $3 } /^[ \t]*\/lib/ { print $1 }' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  ! ldd "$bin" | grep -q 'not found'
}

build() {
  cd "$WORK/deb"
  apt-get download "$KPKG" qemu-guest-agent || return 1
  dpkg-deb -x "$KPKG"_*.deb "$WORK/kernel"
  cp "$WORK"/kernel/boot/vmlinuz-* "$OUT/vmlinuz.new"

  local root="$WORK/root" m f
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,run,tmp,lib/modules,usr/sbin,etc}
  cp /bin/busybox "$root/bin/busybox"
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
           virtio_blk virtio_console; do
    f=$(find "$WORK/kernel/lib/modules" -name "$m.ko*" | head -n 1)
    [[ -n "$f" ]] || { echo "module $m not found"; return 1; }
    case "$f" in
      *.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
      *.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
      *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
  done
  gcc -static -O2 -Wall -o "$root/bin/sluice-agent" "$HERE/agent.c"
  install -m 0755 "$HERE/init" "$root/init"

  local qga=no
  dpkg-deb -x qemu-guest-agent_*.deb "$WORK/qga"
  cp "$WORK/qga/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
  if copy_libs "$root/usr/sbin/qemu-ga" "$root"; then
    qga=yes
  else
    echo "qemu-ga libraries unresolved; guest built without it"
    rm -f "$root/usr/sbin/qemu-ga"
  fi

  (cd "$root" && find . | sort | busybox cpio -o -H newc 2>/dev/null | gzip -1) \
    >"$OUT/initrd.img.new"
  mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"
  mv "$OUT/initrd.img.new" "$OUT/initrd.img"
  {
    echo "kernel=$KPKG $(candidate "$KPKG")"
    echo "qga=$qga"
    echo "qemu-guest-agent=$(candidate qemu-guest-agent)"
    echo "busybox-static=$(installed busybox-static)"
  } >"$OUT/guest.info"
}

if ! (build) >"$LOG" 2>&1; then
  fail "see the log"
fi
rm -rf "$WORK"
echo "$STAMP" >"$OUT/.stamp"

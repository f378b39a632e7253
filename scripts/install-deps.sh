#!/usr/bin/env bash
# Installs the Debian packages Osso needs to build its guest image and run its
# tests. Run as root on Debian 12 (bookworm). Idempotent.
#   build:  make gcc libc6-dev flex bison bc perl patch rsync binutils libelf-dev musl-tools
#   source: linux-source-6.12 (the kernel tarball; Toybox's source is fetched by the builder)
#   tests:  cpio (cross-checks our cpio writer), qemu-system-x86 (boots the image under TCG,
#           and is the benchmark peer), iputils-ping and iproute2 (network tests)
set -euo pipefail
PACKAGES=(
  make gcc libc6-dev flex bison bc perl patch rsync binutils libelf-dev musl-tools
  linux-source-6.12 xz-utils
  cpio qemu-system-x86 iputils-ping iproute2 ca-certificates curl
)
if [ "$(id -u)" != 0 ]; then
  echo "install-deps: not root; run: sudo apt-get install ${PACKAGES[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"

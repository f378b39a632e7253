#!/usr/bin/env bash
# Installs the Debian packages Osso needs to build its guest image and run its
# tests. Run as root on Debian 12 (bookworm). Idempotent.
#   build:  make gcc libc6-dev flex bison bc perl patch rsync binutils libelf-dev musl-tools
#   source: linux-source-6.12 (the kernel tarball; Toybox's source is fetched by the builder)
#   rust:   the x86_64-unknown-linux-musl target (rustup; for the static build)
#   tests:  cpio (cross-checks our cpio writer), qemu-system-x86 (boots the image under TCG,
#           and is the benchmark peer; also level 0 of layer 5's nested KVM),
#           iputils-ping and iproute2 (network tests)
#   layer 5: linux-image-<pinned>-cloud-amd64 and busybox-static are fetched (not
#           installed) by osso-nested with apt-get download
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
# Layer 5 (osso-nested) fetches Debian's cloud kernel and busybox-static with
# `apt-get download`, which needs the archive's package lists.
if [ ${#missing[@]} -ne 0 ] || ! apt-cache show busybox-static linux-image-cloud-amd64 >/dev/null 2>&1; then
  apt-get update -q
fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
else
  echo "install-deps: installing ${missing[*]}"
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The Rust standard library for the static (musl) build that scripts/test.sh
# checks. Rust itself comes from rustup, which must already be installed.
MUSL_TARGET=x86_64-unknown-linux-musl
if ! command -v rustup >/dev/null 2>&1; then
  echo "install-deps: rustup not found; install Rust with rustup (https://rustup.rs), then run: rustup target add $MUSL_TARGET" >&2
  exit 1
fi
if rustup target list --installed | grep -qx "$MUSL_TARGET"; then
  echo "install-deps: Rust target $MUSL_TARGET present"
else
  echo "install-deps: adding Rust target $MUSL_TARGET"
  rustup target add "$MUSL_TARGET"
fi

#!/usr/bin/env bash
# Build every test guest artifact into $VESSEL_CACHE (default ~/.cache/vessel):
# kernel, initramfs, disk. WITH_DEBIAN_KERNEL=1 also fetches Debian's stock
# kernel. Each step skips itself when its outputs are up to date.
set -euo pipefail

here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

"$here/build-kernel.sh"
"$here/build-initramfs.sh"
"$here/build-disk.sh"
if [[ ${WITH_DEBIAN_KERNEL:-0} == 1 ]]; then
	"$here/fetch-debian-kernel.sh"
fi

echo
echo "kernel (bzImage):    ${VESSEL_CACHE}/kernel/bzImage"
echo "kernel (PVH ELF):    ${VESSEL_CACHE}/kernel/vmlinux"
echo "initramfs (gzip):    ${VESSEL_CACHE}/initramfs.cpio.gz"
echo "initramfs (plain):   ${VESSEL_CACHE}/initramfs.cpio"
echo "disk (ext4):         ${VESSEL_CACHE}/disk.ext4"
if [[ -f ${VESSEL_CACHE}/debian/vmlinuz ]]; then
	echo "debian kernel:       ${VESSEL_CACHE}/debian/vmlinuz (PVH ELF: ${VESSEL_CACHE}/debian/vmlinux)"
fi

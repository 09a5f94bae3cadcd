#!/usr/bin/env bash
# Build every test guest artifact into $VESSEL_CACHE (default ~/.cache/vessel):
# kernel, initramfs, the CPU benchmark programs and their initramfs, disk.
# WITH_DEBIAN_KERNEL=1 also fetches Debian's stock kernel and builds its
# initramfs (virtio and ext4 modules) and root disk; WITH_DEBIAN_SYSTEMD=1
# (with it) also a Debian root with systemd (mmdebstrap, about 250 MB of
# packages from deb.debian.org) for bench systemd_boot.
# Also installs the host tools the tests use: acpica-tools (iasl
# disassembles our ACPI tables), qemu-utils (qemu-img and qemu-io judge our
# qcow2 images), qemu-system-x86 (the reference VMM for benchmarks and the
# nested-KVM test), iproute2 (network namespaces), e2fsprogs (debugfs reads
# guest-written file systems). Each step skips itself when up to date.
set -euo pipefail

here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

ensure_qemu
ensure_pkgs acpica-tools iproute2 e2fsprogs curl socat util-linux strace
"$here/build-kernel.sh"
"$here/build-initramfs.sh"
"$here/build-cpubench.sh"
"$here/build-disk.sh"
if [[ ${WITH_DEBIAN_KERNEL:-0} == 1 ]]; then
	"$here/fetch-debian-kernel.sh"
	"$here/build-debian-initramfs.sh"
	"$here/build-debian-root.sh"
	if [[ ${WITH_DEBIAN_SYSTEMD:-0} == 1 ]]; then
		"$here/build-debian-systemd.sh"
	fi
fi
# Every command the tests run, checked after all the installs above.
require_cmds qemu-img qemu-io qemu-system-x86_64 iasl ip debugfs mkfs.ext4 gcc python3 curl socat setpriv md5sum strace

echo
echo "kernel (bzImage):    ${VESSEL_CACHE}/kernel/bzImage"
echo "kernel (PVH ELF):    ${VESSEL_CACHE}/kernel/vmlinux"
echo "initramfs (gzip):    ${VESSEL_CACHE}/initramfs.cpio.gz"
echo "initramfs (plain):   ${VESSEL_CACHE}/initramfs.cpio"
echo "disk (ext4):         ${VESSEL_CACHE}/disk.ext4"
echo "cpubench:            ${VESSEL_CACHE}/cpubench/cpubench (bench initramfs: ${VESSEL_CACHE}/cpubench/initramfs.cpio.gz)"
if [[ -f ${VESSEL_CACHE}/debian/vmlinuz ]]; then
	echo "debian kernel:       ${VESSEL_CACHE}/debian/vmlinuz (PVH ELF: ${VESSEL_CACHE}/debian/vmlinux)"
fi
if [[ -f ${VESSEL_CACHE}/debian/initramfs.cpio.gz ]]; then
	echo "debian initramfs:    ${VESSEL_CACHE}/debian/initramfs.cpio.gz (root: ${VESSEL_CACHE}/debian/root.ext4)"
fi

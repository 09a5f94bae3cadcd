#!/usr/bin/env bash
# Build the initramfs of the nested-KVM test environment: Debian's stock
# kernel under `qemu-system-x86_64 -accel tcg -cpu max` (which offers SVM)
# loads kvm_amd, and a static Vessel runs the minimal test guest with
# --accel kvm on the /dev/kvm that appears.
#
#   $VESSEL_CACHE/nested/initramfs.cpio.gz   busybox + guest/init (as /init),
#       the kvm modules of the Debian kernel under /modules, a static
#       /bin/vessel, and the test guest under /guest (vmlinux, initramfs)
#   $VESSEL_CACHE/nested/vessel              the static vessel binary
#
# WITH_QEMU=1 writes $VESSEL_CACHE/nested/initramfs-qemu.cpio.gz instead,
# which also carries the host's qemu-system-x86_64 with its libraries and
# the microvm firmware (for bench/src/bin/nested_boot.rs).
#
# Needs guest/build-all.sh with WITH_DEBIAN_KERNEL=1 first. Boot it with
# guest/run-nested.sh. CARGO_TARGET_DIR is honoured.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT=${VESSEL_CACHE}/nested
DEB=${VESSEL_CACHE}/debian
GEN_INIT_CPIO=${VESSEL_CACHE}/tools/gen_init_cpio
REPO=$(cd "${GUEST_DIR}/.." && pwd)
TARGET=x86_64-unknown-linux-gnu

ensure_qemu
ensure_pkgs busybox-static libc6-dev gzip
for f in "$DEB/vmlinuz" "$DEB/version" "${VESSEL_CACHE}/kernel/vmlinux" "${VESSEL_CACHE}/initramfs.cpio.gz" "$GEN_INIT_CPIO"; do
	[[ -e $f ]] || die "$f is missing: run WITH_DEBIAN_KERNEL=1 guest/build-all.sh first"
done
kver=$(<"$DEB/version")
mods=$DEB/modules/$kver/kernel
# kvm-amd needs ccp and kvm; kvm needs irqbypass (modules.dep), in load order.
MODULES=(virt/lib/irqbypass.ko drivers/crypto/ccp/ccp.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko)

log "building a static vessel (${TARGET}, +crt-static)"
target_dir=${CARGO_TARGET_DIR:-${REPO}/target}
(cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -q -p vessel --target "$TARGET")
bin=${target_dir}/${TARGET}/release/vessel
mkdir -p "$OUT"
strip -o "$OUT/vessel.tmp" "$bin"
mv "$OUT/vessel.tmp" "$OUT/vessel"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
list=$stage/list
{
	for d in /bin /sbin /usr /usr/bin /usr/sbin /dev /etc /proc /sys /tmp /root /run /modules /guest; do
		echo "dir $d 0755 0 0"
	done
	echo "nod /dev/console 0600 0 0 c 5 1"
	echo "nod /dev/null 0666 0 0 c 1 3"
	echo "file /init ${GUEST_DIR}/init 0755 0 0"
	echo "file /bin/busybox /bin/busybox 0755 0 0"
	echo "file /bin/vessel $OUT/vessel 0755 0 0"
	echo "file /guest/vmlinux ${VESSEL_CACHE}/kernel/vmlinux 0644 0 0"
	echo "file /guest/initramfs.cpio.gz ${VESSEL_CACHE}/initramfs.cpio.gz 0644 0 0"
	printf '%s\n' "${MODULES[@]##*/}" >"$stage/modules.order"
	echo "file /modules.order $stage/modules.order 0644 0 0"
	for m in "${MODULES[@]}"; do
		[[ -f $mods/$m ]] || die "$mods/$m is missing"
		echo "file /modules/$(basename "$m") $mods/$m 0644 0 0"
	done
	busybox_applet_links
} >"$list"
name=initramfs.cpio.gz
if [[ ${WITH_QEMU:-0} == 1 ]]; then
	name=initramfs-qemu.cpio.gz
	qemu=$(command -v qemu-system-x86_64)
	{
		echo "dir /lib 0755 0 0"
		echo "dir /lib64 0755 0 0"
		echo "dir /usr/lib 0755 0 0"
		echo "dir /usr/lib/x86_64-linux-gnu 0755 0 0"
		echo "dir /lib/x86_64-linux-gnu 0755 0 0"
		echo "dir /usr/share 0755 0 0"
		echo "dir /usr/share/qemu 0755 0 0"
		echo "file /usr/bin/qemu-system-x86_64 $(readlink -f "$qemu") 0755 0 0"
		# Every shared library, at the path the dynamic loader looks for it.
		ldd "$qemu" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
			while read -r lib; do
				echo "file $lib $(readlink -f "$lib") 0755 0 0"
			done
		for fw in bios-microvm.bin qboot.rom linuxboot_dma.bin linuxboot.bin pvh.bin kvmvapic.bin; do
			[[ -e /usr/share/qemu/$fw ]] && echo "file /usr/share/qemu/$fw $(readlink -f "/usr/share/qemu/$fw") 0644 0 0"
		done
	} >>"$list"
fi
"$GEN_INIT_CPIO" -t 0 "$list" | gzip -1 -n >"$OUT/$name.tmp"
mv "$OUT/$name.tmp" "$OUT/$name"
log "nested initramfs: $OUT/$name ($(stat -c %s "$OUT/$name") bytes)"

#!/usr/bin/env bash
# Boot the test guest under QEMU TCG with the reference microvm command line
# (DESIGN.md, "The guest we test with"): the yardstick for Vessel's boots.
#
#   guest/qemu-run.sh [options] [--] [command...]
#     -k FILE   kernel (default: $VESSEL_CACHE/kernel/bzImage; a vmlinux boots via PVH)
#     -i FILE   initramfs (default: $VESSEL_CACHE/initramfs.cpio.gz)
#     -s N      vCPUs (default 1)
#     -m SIZE   memory (default 256M)
#     -d FILE   attach FILE as a raw virtio-blk disk, /dev/vda in the guest
#               (snapshot=on: guest writes never reach FILE)
#     -a ARGS   extra kernel command line
#     -A        ACPI on: the guest finds virtio-mmio devices in the DSDT
#               (LNRO0005) instead of on the command line; Debian's kernel
#               needs it (and tsc_early_khz= under TCG)
#   The command runs through the guest's /init (vessel.cmd=); without one
#   the guest starts an interactive shell on the serial console.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

kernel=${VESSEL_CACHE}/kernel/bzImage
initrd=${VESSEL_CACHE}/initramfs.cpio.gz
smp=1 mem=256M disk='' extra='' acpi=off
while getopts 'k:i:s:m:d:a:Ah' opt; do
	case $opt in
	k) kernel=$OPTARG ;;
	i) initrd=$OPTARG ;;
	s) smp=$OPTARG ;;
	m) mem=$OPTARG ;;
	d) disk=$OPTARG ;;
	a) extra=$OPTARG ;;
	A) acpi=on ;;
	*) sed -n '2,18s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))

ensure_qemu

# QEMU's microvm has no i8042, so the guest leaves through a triple fault
# (reboot=t), which -no-reboot turns into QEMU exiting.
append="console=ttyS0 reboot=t pci=off"
if (($# > 0)); then
	append+=" vessel.cmd=$(printf '%s\n' "$*" | base64 -w0)"
fi
[[ -z $extra ]] || append+=" $extra"

args=(-accel tcg -M "microvm,x-option-roms=off,acpi=$acpi" -cpu qemu64
	-m "$mem" -smp "$smp" -nodefaults -no-user-config -nographic -no-reboot
	-serial stdio -kernel "$kernel" -initrd "$initrd" -append "$append")
if [[ -n $disk ]]; then
	args+=(-drive "id=vda,file=$disk,format=raw,if=none,snapshot=on" -device "virtio-blk-device,drive=vda")
fi

start=$(date +%s.%N)
status=0
qemu-system-x86_64 "${args[@]}" || status=$?
end=$(date +%s.%N)
printf 'qemu exited with %d after %.2f s wall\n' "$status" "$(echo "$end - $start" | bc)" >&2
exit "$status"

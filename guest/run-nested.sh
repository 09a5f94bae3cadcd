#!/usr/bin/env bash
# Boot the nested-KVM environment (guest/build-nested.sh): Debian's stock
# kernel under QEMU TCG with `-cpu max`, which offers SVM, so kvm_amd loads
# and /dev/kvm works inside. Then run a command there, through guest/init.
#
#   guest/run-nested.sh [-s N] [-m SIZE] [--] command...
#     -s N      vCPUs of the QEMU guest (default 1)
#     -m SIZE   its memory (default 1G)
#     -i FILE   its initramfs (default: $VESSEL_CACHE/nested/initramfs.cpio.gz)
#     -f SRC:DST also put the host file SRC at DST there (repeatable; DST's
#               folder is made)
#   In the command, /bin/vessel is a static Vessel, /guest/vmlinux and
#   /guest/initramfs.cpio.gz the minimal test guest. The kvm modules are
#   loaded first; "NESTED-KVM-READY" is printed once /dev/kvm exists.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

smp=1 mem=1G initrd=${VESSEL_CACHE}/nested/initramfs.cpio.gz
files=()
while getopts 's:m:i:f:h' opt; do
	case $opt in
	s) smp=$OPTARG ;;
	m) mem=$OPTARG ;;
	i) initrd=$OPTARG ;;
	f) files+=("$OPTARG") ;;
	*) sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))

ensure_qemu
[[ -f $initrd ]] || die "$initrd is missing: run guest/build-nested.sh"

setup='for m in $(cat /modules.order 2>/dev/null || echo irqbypass.ko ccp.ko kvm.ko kvm-amd.ko); do insmod /modules/$m || echo "insmod $m failed"; done
if [ -c /dev/kvm ]; then echo NESTED-KVM-READY; else echo "NESTED-KVM-MISSING: no /dev/kvm"; grep -o -w -m1 svm /proc/cpuinfo || echo "the CPU has no svm flag"; fi'
# The command goes in a second cpio archive appended to the initramfs (the
# kernel unpacks both): a kernel command line holds only 2 KiB.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '%s\n%s\n' "$setup" "$*" >"$work/cmd.sh"
printf 'file /cmd.sh %s 0755 0 0\n' "$work/cmd.sh" >"$work/list"
for f in "${files[@]}"; do
	src=${f%%:*} dst=${f#*:}
	[[ -f $src && $dst == /* ]] || die "-f $f: wants an existing file and an absolute destination"
	printf 'dir %s 0755 0 0\nfile %s %s 0644 0 0\n' "$(dirname "$dst")" "$dst" "$src" >>"$work/list"
done
cp "$initrd" "$work/initrd"
"${VESSEL_CACHE}/tools/gen_init_cpio" -t 0 "$work/list" | gzip -1 -n >>"$work/initrd"
b64=$(printf 'sh /cmd.sh\n' | base64 -w0)
qemu-system-x86_64 -accel tcg -cpu max -smp "$smp" -m "$mem" \
	-nodefaults -no-user-config -nographic -no-reboot -serial stdio \
	-kernel "${VESSEL_CACHE}/debian/vmlinuz" -initrd "$work/initrd" \
	-append "console=ttyS0 panic=-1 loglevel=4 vessel.cmd=$b64 vessel.end=poweroff"

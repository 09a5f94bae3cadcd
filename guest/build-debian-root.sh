#!/usr/bin/env bash
# Build the root disk for Debian's stock kernel: $VESSEL_CACHE/debian/root.ext4,
# a 32 MiB ext4 image made with mkfs.ext4 -d (no mount, no loop device):
# busybox-static with its applet links, guest/init as /init (the usual
# markers and vessel.cmd=), and /etc/vessel-root, whose line
# "vessel debian root" tells a test that the guest runs from this disk.
# build-debian-initramfs.sh's init mounts it from /dev/vda and switch_roots
# into it. Reproducible (fixed UUID, hash seed and timestamps). Skips the
# work when nothing changed; FORCE=1 redoes it.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT=${VESSEL_CACHE}/debian/root.ext4
STAMP=${VESSEL_CACHE}/debian/root.inputs.sha256
INIT=${GUEST_DIR}/init
SIZE=32M
UUID=5e55e100-0000-4000-8000-000000000002

ensure_pkgs e2fsprogs busybox-static

want=$(hash_of "$INIT" "${BASH_SOURCE[0]}" "${GUEST_DIR}/lib.sh" -- \
	"$(pkg_version e2fsprogs)" "$(pkg_version busybox-static)")
if [[ ${FORCE:-0} != 1 ]] && up_to_date "$STAMP" "$want" "$OUT"; then
	log "debian root disk up to date: $OUT"
	exit 0
fi
rm -f "$STAMP"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root"
for d in bin sbin usr/bin usr/sbin dev etc proc sys tmp root mnt run; do
	mkdir -p "$root/$d"
done
install -m 0755 /bin/busybox "$root/bin/busybox"
install -m 0755 "$INIT" "$root/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'vessel debian root\n' >"$root/etc/vessel-root"
chmod 0644 "$root"/etc/*
chmod 1777 "$root/tmp"
# The same applet links as the initramfs (relative to /).
busybox_applet_links | while read -r _ link _; do
	ln -s /bin/busybox "$root$link"
done
find "$root" -exec touch -h -d @0 {} +

make_ext4 "$root" "$OUT" "$SIZE" vessel-root "$UUID"
printf '%s\n' "$want" >"$STAMP"
log "debian root disk: $OUT ($SIZE ext4, label vessel-root, UUID $UUID)"

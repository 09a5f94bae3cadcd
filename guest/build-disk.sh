#!/usr/bin/env bash
# Build the Vessel test disk: $VESSEL_CACHE/disk.ext4, a 64 MiB ext4 image
# made with mkfs.ext4 -d (no mount, no loop device). Its contents are fixed
# so tests can check what a guest reads:
#   /hello.txt    "hello from the vessel test disk\n"
#   /pattern.bin  1 MiB: byte i is (i mod 251)
#   /SHA256SUMS   sha256sum of both, in sha256sum -c format
#   /tools/mkfs.ext4  e2fsprogs' mke2fs with its libraries, for guests to
#                 make file systems (busybox's mke2fs makes only ext2):
#                 `sh /mnt/tools/mkfs.ext4 /dev/vda`
#   /tools/randio direct-I/O benchmark tool (guest/tools/randio.c, static)
# The image is reproducible (fixed UUID, hash seed and timestamps).
# Skips the work when nothing changed; FORCE=1 redoes it.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT=${VESSEL_CACHE}/disk.ext4
STAMP=${VESSEL_CACHE}/disk.inputs.sha256
SIZE=64M
UUID=5e55e100-0000-4000-8000-000000000001

ensure_pkgs e2fsprogs python3 gcc libc6-dev

want=$(hash_of "${BASH_SOURCE[0]}" "${GUEST_DIR}/tools/randio.c" "${GUEST_DIR}/lib.sh" -- "$(pkg_version e2fsprogs)" "$(pkg_version libc6)")
if [[ ${FORCE:-0} != 1 ]] && up_to_date "$STAMP" "$want" "$OUT"; then
	log "disk up to date: $OUT"
	exit 0
fi
rm -f "$STAMP"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root"
printf 'hello from the vessel test disk\n' >"$root/hello.txt"
python3 -c 'import sys; sys.stdout.buffer.write(bytes(i % 251 for i in range(1 << 20)))' >"$root/pattern.bin"
(cd "$root" && sha256sum hello.txt pattern.bin >SHA256SUMS)
chmod 0644 "$root"/*
tools=$root/tools
mkdir -p "$tools/lib"
install -m 0755 /sbin/mke2fs "$tools/mke2fs"
install -m 0644 /etc/mke2fs.conf "$tools/mke2fs.conf"
for l in $(ldd /sbin/mke2fs | grep -o '/[^ ]*\.so[^ ]*' | sort -u); do
	install -m 0755 "$(readlink -f "$l")" "$tools/lib/$(basename "$l")"
done
cat >"$tools/mkfs.ext4" <<'SH'
#!/bin/sh
d=${0%/*}
MKE2FS_CONFIG=$d/mke2fs.conf exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/mke2fs" -t ext4 "$@"
SH
chmod 0755 "$tools/mkfs.ext4"
cc -O2 -static -o "$tools/randio" "${GUEST_DIR}/tools/randio.c"
strip "$tools/randio"
find "$root" -exec touch -h -d @0 {} +

make_ext4 "$root" "$OUT" "$SIZE" vessel "$UUID"
printf '%s\n' "$want" >"$STAMP"
log "disk: $OUT ($SIZE ext4, label vessel, UUID $UUID)"

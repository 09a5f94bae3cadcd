#!/usr/bin/env bash
# Fetch Debian's stock kernel (the "real distro kernel" case) without
# installing it: `apt-get download` the package that linux-image-amd64
# depends on and unpack it into the cache:
#   $VESSEL_CACHE/debian/vmlinuz              the bzImage (XZ-compressed)
#   $VESSEL_CACHE/debian/vmlinux              the ELF inside it, for the PVH entry
#   $VESSEL_CACHE/debian/config               its kernel config
#   $VESSEL_CACHE/debian/modules/<version>/   its /lib/modules tree, with modules.dep
#   $VESSEL_CACHE/debian/version              <version>, e.g. 6.1.0-56-amd64
# Skips the work when that package version is already there; FORCE=1 redoes it.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT=${VESSEL_CACHE}/debian

ensure_pkgs dpkg apt kmod xz-utils binutils

# linux-image-amd64 is a metapackage; the kernel is in the package it depends on.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
	awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
if [[ -z $pkg ]]; then
	log "linux-image-amd64 unknown to apt; running apt-get update"
	apt-get update -q
	pkg=$(apt-cache depends linux-image-amd64 |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
fi
[[ -n $pkg ]] || die "cannot resolve the package behind linux-image-amd64"
kver=${pkg#linux-image-}
pver=$(apt-cache policy "$pkg" | awk '$1 == "Candidate:" { print $2 }')
want="$pkg $pver"

if [[ ${FORCE:-0} != 1 && -f $OUT/vmlinuz && -f $OUT/package && $(<"$OUT/package") == "$want" ]]; then
	log "debian kernel up to date: $OUT/vmlinuz ($want)"
	exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "downloading $pkg $pver"
# apt's sandbox user (_apt) cannot write into our private temp dir.
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$pver")
deb=$(find "$work" -maxdepth 1 -name '*.deb' -print -quit)
[[ -n $deb ]] || die "apt-get download produced no .deb"
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$work/root"
depmod -b "$work/root" "$kver"

rm -rf "$OUT"
mkdir -p "$OUT/modules"
cp "$work/root/boot/vmlinuz-$kver" "$OUT/vmlinuz"
cp "$work/root/boot/config-$kver" "$OUT/config"
mv "$work/root/lib/modules/$kver" "$OUT/modules/$kver"

# The PVH entry point is an ELF note, so PVH boots need the vmlinux that the
# bzImage carries XZ-compressed. Find the XZ stream and unpack it.
off=$(LC_ALL=C grep -m1 -obUaP '\xfd7zXZ\x00' "$OUT/vmlinuz" | awk -F: 'NR == 1 { print $1 }')
[[ -n $off ]] || die "no XZ stream in $OUT/vmlinuz"
# xz stops at the end of the stream, so tail may die of SIGPIPE: that is fine.
{ tail -c "+$((off + 1))" "$OUT/vmlinuz" || true; } | xz -dcq --single-stream >"$OUT/vmlinux"
readelf -n "$OUT/vmlinux" | grep -q 'Xen.*0x00000012' ||
	die "$OUT/vmlinux has no PVH (Xen PHYS32_ENTRY) note"

printf '%s\n' "$kver" >"$OUT/version"
printf '%s\n' "$want" >"$OUT/package"
log "debian kernel: $OUT/vmlinuz ($kver, $(stat -c %s "$OUT/vmlinuz") bytes), modules in $OUT/modules/$kver"

#!/usr/bin/env bash
# Build a Debian 12 root disk that boots with systemd:
# $VESSEL_CACHE/debian/systemd-root.ext4, a 1 GiB ext4 image of
# `mmdebstrap --variant=minbase --include=systemd-sysv,udev bookworm` (from
# deb.debian.org), with
#   /init                     exec /lib/systemd/systemd: build-debian-initramfs.sh's
#                             init switch_roots into /init on the root disk
#   vessel-multi-user.service ordered after multi-user.target and wanted by it:
#                             prints VESSEL-MULTI-USER on the console when
#                             systemd has reached multi-user
# For the issue-15 benchmark (bench/src/bin/systemd_boot.rs) with Debian's
# stock kernel and its initramfs, disk read-only. Skips the work when
# nothing changed; FORCE=1 redoes it (and fetches the newest packages).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT=${VESSEL_CACHE}/debian/systemd-root.ext4
STAMP=${VESSEL_CACHE}/debian/systemd-root.inputs.sha256
SIZE=1G
UUID=5e55e100-0000-4000-8000-000000000003

ensure_pkgs mmdebstrap e2fsprogs

want=$(hash_of "${BASH_SOURCE[0]}" "${GUEST_DIR}/lib.sh" -- "$(pkg_version mmdebstrap)" "$(pkg_version e2fsprogs)")
if [[ ${FORCE:-0} != 1 ]] && up_to_date "$STAMP" "$want" "$OUT"; then
	log "debian systemd root disk up to date: $OUT"
	exit 0
fi
rm -f "$STAMP"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root

unit='[Unit]
Description=Vessel: print a marker once multi-user.target is reached
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c "echo VESSEL-MULTI-USER >/dev/console"

[Install]
WantedBy=multi-user.target'

log "mmdebstrap: Debian 12 minbase with systemd-sysv"
SOURCE_DATE_EPOCH=0 mmdebstrap --mode=root --variant=minbase --include=systemd-sysv,udev \
	--customize-hook='printf "#!/bin/sh\nexec /lib/systemd/systemd \"\$@\"\n" >"$1/init"; chmod 0755 "$1/init"' \
	--customize-hook="printf '%s\n' '$unit' >\"\$1/etc/systemd/system/vessel-multi-user.service\"" \
	--customize-hook='mkdir -p "$1/etc/systemd/system/multi-user.target.wants"; ln -sf ../vessel-multi-user.service "$1/etc/systemd/system/multi-user.target.wants/vessel-multi-user.service"' \
	--customize-hook='echo vessel >"$1/etc/hostname"; : >"$1/etc/machine-id"' \
	bookworm "$root" http://deb.debian.org/debian
find "$root" -exec touch -h -d @0 {} +
make_ext4 "$root" "$OUT" "$SIZE" vessel-systemd "$UUID"
printf '%s\n' "$want" >"$STAMP"
log "debian systemd root disk: $OUT ($SIZE ext4, label vessel-systemd, UUID $UUID)"

#!/usr/bin/env bash
# Build the initramfs for Debian's stock kernel (fetch-debian-kernel.sh):
#   $VESSEL_CACHE/debian/initramfs.cpio.gz
# Debian builds virtio and ext4 as modules. This archive holds busybox-static,
# the modules below with their dependencies (resolved from the kernel's
# modules.dep, in load order) and guest/debian-initramfs-init as /init, which
# loads them, mounts the ext4 root from /dev/vda (build-debian-root.sh) and
# switch_roots into it. Reproducible; skips the work when nothing changed;
# FORCE=1 redoes it.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEB=${VESSEL_CACHE}/debian
INIT=${GUEST_DIR}/debian-initramfs-init
OUT=${DEB}/initramfs.cpio.gz
STAMP=${DEB}/initramfs.inputs.sha256
# What the guest needs; crc32c_generic because ext4 and jbd2 ask the crypto
# API for "crc32c" at mount time, which would need a working modprobe.
MODULES=(virtio_mmio virtio_blk virtio_net virtio_rng virtio_console crc32c_generic ext4)

ensure_pkgs busybox-static gzip

[[ -f $DEB/version && -f $DEB/package ]] || die "no Debian kernel in $DEB: run guest/fetch-debian-kernel.sh first"
kver=$(<"$DEB/version")
moddir=$DEB/modules/$kver
[[ -f $moddir/modules.dep ]] || die "$moddir/modules.dep is missing: FORCE=1 guest/fetch-debian-kernel.sh"

want=$(hash_of "$INIT" "${BASH_SOURCE[0]}" "${GUEST_DIR}/lib.sh" "$DEB/package" -- \
	"$(pkg_version busybox-static)" "${MODULES[*]}")
if [[ ${FORCE:-0} != 1 ]] && up_to_date "$STAMP" "$want" "$OUT"; then
	log "debian initramfs up to date: $OUT"
	exit 0
fi
rm -f "$STAMP"

# resolve MODULE: print the module's path in modules.dep after those of its
# dependencies, each once (modules.dep lists every dependency, direct or not,
# with the ones loaded last first).
declare -A seen=()
resolve() {
	local name=${1//-/_} line path deps d i
	line=$(awk -v n="$name" '{
		p = $1; sub(/:$/, "", p); b = p; sub(/.*\//, "", b); sub(/\.ko(\.[a-z]+)?$/, "", b); gsub(/-/, "_", b)
		if (b == n) { print; exit }
	}' "$moddir/modules.dep")
	[[ -n $line ]] || die "module $1 is not in $moddir/modules.dep"
	path=${line%%:*}
	[[ -z ${seen[$path]:-} ]] || return 0
	read -r -a deps <<<"${line#*:}"
	for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
		d=${deps[i]}
		if [[ -z ${seen[$d]:-} ]]; then
			d=${d##*/}
			resolve "${d%%.ko*}"
		fi
	done
	seen[$path]=1
	printf '%s\n' "$path"
}

GEN_INIT_CPIO=$(ensure_gen_init_cpio)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

order=$stage/load-order
for m in "${MODULES[@]}"; do resolve "$m"; done >"$order"
grep -q '\.ko$' "$order" || die "unexpected module names in $order"
if grep -qv '\.ko$' "$order"; then
	die "compressed modules are not supported by busybox insmod: $(grep -v '\.ko$' "$order" | head -1)"
fi

install -m 0755 /bin/busybox "$stage/busybox"
install -m 0755 "$INIT" "$stage/init"
touch -d @0 "$stage"/*

list=$stage/list
{
	for d in /bin /sbin /usr /usr/bin /usr/sbin /dev /proc /sys /newroot /lib /lib/modules "/lib/modules/$kver"; do
		echo "dir $d 0755 0 0"
	done
	echo "nod /dev/console 0600 0 0 c 5 1"
	echo "nod /dev/null 0666 0 0 c 1 3"
	echo "file /init $stage/init 0755 0 0"
	echo "file /bin/busybox $stage/busybox 0755 0 0"
	echo "file /lib/modules/load-order $order 0644 0 0"
	# Each module's directories, then the module.
	while read -r m; do
		d=$(dirname "$m") p="/lib/modules/$kver"
		IFS=/ read -r -a parts <<<"$d"
		for part in "${parts[@]}"; do
			p+=/$part
			echo "dir $p 0755 0 0"
		done
		echo "file /lib/modules/$kver/$m $moddir/$m 0644 0 0"
	done <"$order"
	busybox_applet_links
} | awk '!seen[$0]++' >"$list"

mkdir -p "$DEB"
"$GEN_INIT_CPIO" -t 0 "$list" | gzip -9 -n >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
printf '%s\n' "$want" >"$STAMP"
log "debian initramfs: $OUT ($(stat -c %s "$OUT") bytes) loads: $(xargs -n1 basename <"$order" | tr '\n' ' ')"

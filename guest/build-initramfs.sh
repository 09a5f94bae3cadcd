#!/usr/bin/env bash
# Build the Vessel test initramfs from Debian's busybox-static, guest/init and
# the guest agent (crates/agent, built static: /bin/vessel-agent):
#   $VESSEL_CACHE/initramfs.cpio     (uncompressed newc cpio)
#   $VESSEL_CACHE/initramfs.cpio.gz  (the same, gzip)
# The archive is written by the kernel's usr/gen_init_cpio from a file list,
# so /dev/console exists in it without mknod, and it is reproducible (all
# mtimes 0, owner root). Skips the work when nothing changed; FORCE=1 redoes it.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BUSYBOX=/bin/busybox
INIT=${GUEST_DIR}/init
OUT_CPIO=${VESSEL_CACHE}/initramfs.cpio
OUT_GZ=${VESSEL_CACHE}/initramfs.cpio.gz
STAMP=${VESSEL_CACHE}/initramfs.inputs.sha256

ensure_pkgs busybox-static gcc libc6-dev gzip xz-utils linux-source-6.1

REPO=$(cd "${GUEST_DIR}/.." && pwd)
AGENT_INPUTS=("$REPO/crates/agent/Cargo.toml" "$REPO"/crates/agent/src/*.rs)
want=$(hash_of "$INIT" "${BASH_SOURCE[0]}" "${GUEST_DIR}/lib.sh" "${AGENT_INPUTS[@]}" -- \
	"$(pkg_version busybox-static)" "$(rustc --version)" "$(grep -A1 '^name = "libc"$' "$REPO/Cargo.lock")")
if [[ ${FORCE:-0} != 1 ]] && up_to_date "$STAMP" "$want" "$OUT_CPIO" "$OUT_GZ" ; then
	log "initramfs up to date: $OUT_GZ"
	exit 0
fi
rm -f "$STAMP"

GEN_INIT_CPIO=$(ensure_gen_init_cpio)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# The agent: static (glibc's static libc), no debug info, so it runs in a
# guest with no shared libraries at all.
log "building the guest agent (cargo, static)"
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
	CARGO_PROFILE_RELEASE_DEBUG=0 \
	cargo build --release --locked --quiet --manifest-path "$REPO/Cargo.toml" -p vessel-agent \
	--target x86_64-unknown-linux-gnu --target-dir "$REPO/target/agent"
AGENT=$REPO/target/agent/x86_64-unknown-linux-gnu/release/vessel-agent

# Files go in with their own mtime; pin it so the archive is reproducible.
install -m 0755 "$BUSYBOX" "$stage/busybox"
install -m 0755 "$AGENT" "$stage/vessel-agent"
install -m 0755 "$INIT" "$stage/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/passwd"
printf 'root:x:0:\n' >"$stage/group"
touch -d @0 "$stage"/*

list=$stage/list
{
	for d in /bin /sbin /usr /usr/bin /usr/sbin /dev /etc /proc /sys /tmp /root /mnt /run; do
		echo "dir $d 0755 0 0"
	done
	echo "nod /dev/console 0600 0 0 c 5 1"
	echo "nod /dev/null 0666 0 0 c 1 3"
	echo "file /init $stage/init 0755 0 0"
	echo "file /bin/busybox $stage/busybox 0755 0 0"
	echo "file /bin/vessel-agent $stage/vessel-agent 0755 0 0"
	echo "file /etc/passwd $stage/passwd 0644 0 0"
	echo "file /etc/group $stage/group 0644 0 0"
	busybox_applet_links
} >"$list"

"$GEN_INIT_CPIO" -t 0 "$list" >"$OUT_CPIO.tmp"
gzip -9 -n -c "$OUT_CPIO.tmp" >"$OUT_GZ.tmp"
mv "$OUT_CPIO.tmp" "$OUT_CPIO"
mv "$OUT_GZ.tmp" "$OUT_GZ"
printf '%s\n' "$want" >"$STAMP"
log "initramfs: $OUT_GZ ($(stat -c %s "$OUT_GZ") bytes), $OUT_CPIO ($(stat -c %s "$OUT_CPIO") bytes), $(grep -c '^slink' "$list") applet links"

#!/usr/bin/env bash
# Build the CPU-bound guest programs (guest/cpubench/cpubench.c) and a bench
# initramfs that holds them:
#   $VESSEL_CACHE/cpubench/cpubench            static binary (also run natively
#                                              by the bench as the checksum reference)
#   $VESSEL_CACHE/cpubench/initramfs.cpio.gz   the test initramfs plus /bin/cpubench
# The bench initramfs is the test initramfs (initramfs.cpio, from
# build-initramfs.sh) with a second cpio archive appended; the kernel
# unpacks concatenated archives in order. gcc -O2, baseline x86-64, static
# glibc, so the same binary runs on the host and in a guest with no
# libraries. Skips the work when nothing changed; FORCE=1 redoes it.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SRC=${GUEST_DIR}/cpubench/cpubench.c
BASE=${VESSEL_CACHE}/initramfs.cpio
OUT_DIR=${VESSEL_CACHE}/cpubench
OUT_BIN=${OUT_DIR}/cpubench
OUT_GZ=${OUT_DIR}/initramfs.cpio.gz
STAMP=${OUT_DIR}/inputs.sha256

ensure_pkgs gcc libc6-dev gzip
[[ -f $BASE ]] || die "missing $BASE: run guest/build-initramfs.sh first"

want=$(hash_of "$SRC" "$BASE" "${BASH_SOURCE[0]}" "${GUEST_DIR}/lib.sh" -- \
	"$(pkg_version gcc-12 2>/dev/null || pkg_version gcc)" "$(pkg_version libc6-dev)")
if [[ ${FORCE:-0} != 1 ]] && up_to_date "$STAMP" "$want" "$OUT_BIN" "$OUT_GZ"; then
	log "cpubench up to date: $OUT_GZ"
	exit 0
fi
rm -f "$STAMP"

GEN_INIT_CPIO=$(ensure_gen_init_cpio)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

log "building cpubench (gcc -O2 -static)"
gcc -O2 -static -s -o "$stage/cpubench" "$SRC" -lm
touch -d @0 "$stage/cpubench"
printf '%s\n' "file /bin/cpubench $stage/cpubench 0755 0 0" >"$stage/list"
"$GEN_INIT_CPIO" -t 0 "$stage/list" >"$stage/extra.cpio"

mkdir -p "$OUT_DIR"
cat "$BASE" "$stage/extra.cpio" | gzip -9 -n >"$OUT_GZ.tmp"
install -m 0755 "$stage/cpubench" "$OUT_BIN.tmp"
mv "$OUT_GZ.tmp" "$OUT_GZ"
mv "$OUT_BIN.tmp" "$OUT_BIN"
printf '%s\n' "$want" >"$STAMP"
log "cpubench: $OUT_BIN, bench initramfs $OUT_GZ ($(stat -c %s "$OUT_GZ") bytes)"

#!/usr/bin/env bash
# Build the Vessel test kernel: Debian's linux-source-6.1, `make tinyconfig`
# plus guest/kernel.config. Outputs $VESSEL_CACHE/kernel/{bzImage,vmlinux}.
#
# Skips the build when both outputs exist and neither the fragment, RECIPE
# below nor the linux-source-6.1 package changed. FORCE=1 rebuilds.
# The version string is pinned (user, host, build number, timestamp) so that
# the same inputs give the same kernel (not yet checked bit for bit).
# JOBS=N overrides the make parallelism (default: nproc).
# CONFIG_ONLY=1 stops after writing and checking the .config.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

FRAGMENT=${GUEST_DIR}/kernel.config
OUT=${VESSEL_CACHE}/kernel
BUILD=${OUT}/build
JOBS=${JOBS:-$(nproc)}
STAMP=${OUT}/inputs.sha256
# Bump when the way the kernel is built changes, to force a rebuild.
RECIPE=3

export KBUILD_BUILD_USER=vessel KBUILD_BUILD_HOST=vessel KBUILD_BUILD_VERSION=1
export KBUILD_BUILD_TIMESTAMP="Thu Jan  1 00:00:00 UTC 1970"

ensure_pkgs linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev \
	cpio lz4 xz-utils kmod binutils

want=$(hash_of "$FRAGMENT" -- "recipe $RECIPE" "$(pkg_version linux-source-6.1)")
if [[ ${FORCE:-0} != 1 ]] && up_to_date "$STAMP" "$want" "$OUT/bzImage" "$OUT/vmlinux"; then
	log "kernel up to date: $OUT/bzImage $OUT/vmlinux"
	exit 0
fi

ensure_linux_src
mkdir -p "$BUILD"
rm -f "$STAMP"

kmake() {
	nice -n 10 make -C "$LINUX_SRC" O="$BUILD" ARCH=x86_64 "$@"
}

log "configuring: tinyconfig + ${FRAGMENT} (log: $OUT/config.log)"
{
	kmake tinyconfig
	# Same as `merge_config.sh -n`: options the fragment makes visible take
	# "no" unless the fragment names them, instead of their defaults.
	(cd "$BUILD" && "$LINUX_SRC/scripts/kconfig/merge_config.sh" -m -O "$BUILD" "$BUILD/.config" "$FRAGMENT")
	mv "$BUILD/.config" "$BUILD/vessel-merged.config"
	kmake KCONFIG_ALLCONFIG="$BUILD/vessel-merged.config" allnoconfig
} >"$OUT/config.log" 2>&1 || { cat "$OUT/config.log" >&2; die "kernel configuration failed"; }

# Every line of the fragment must survive olddefconfig unchanged.
log "verifying .config against the fragment"
bad=0
while IFS= read -r line; do
	if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		if ! grep -qxF -- "$line" "$BUILD/.config"; then
			got=$(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$BUILD/.config" || echo "(absent)")
			printf 'error: wanted %s, .config has %s\n' "$line" "$got" >&2
			bad=1
		fi
	elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		if grep -qE "^${BASH_REMATCH[1]}=" "$BUILD/.config"; then
			printf 'error: wanted %s unset, .config has %s\n' "${BASH_REMATCH[1]}" \
				"$(grep -E "^${BASH_REMATCH[1]}=" "$BUILD/.config")" >&2
			bad=1
		fi
	fi
done <"$FRAGMENT"
((bad == 0)) || die "kernel config lost options from ${FRAGMENT} (see above); fix the fragment's dependencies"
log "all $(grep -c '^CONFIG_\|^# CONFIG_' "$FRAGMENT") fragment lines present in $BUILD/.config"
if [[ ${CONFIG_ONLY:-0} == 1 ]]; then
	exit 0
fi

log "building with make -j${JOBS} (log: $OUT/build.log)"
start=$SECONDS
kmake -j"$JOBS" bzImage vmlinux 2>&1 | tee "$OUT/build.log"
log "kernel built in $((SECONDS - start)) s"

# The PVH entry point is an ELF note (XEN_ELFNOTE_PHYS32_ENTRY, type 0x12).
readelf -n "$BUILD/vmlinux" | grep -q 'Xen.*0x00000012' ||
	die "vmlinux has no PVH (Xen PHYS32_ENTRY) note"

cp "$BUILD/arch/x86/boot/bzImage" "$OUT/bzImage.tmp" && mv "$OUT/bzImage.tmp" "$OUT/bzImage"
cp "$BUILD/vmlinux" "$OUT/vmlinux.tmp" && mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
cp "$BUILD/.config" "$OUT/config"
printf '%s\n' "$want" >"$STAMP"
log "kernel: $OUT/bzImage ($(stat -c %s "$OUT/bzImage") bytes), $OUT/vmlinux ($(stat -c %s "$OUT/vmlinux") bytes)"

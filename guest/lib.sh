# shellcheck shell=bash
# Shared helpers for the guest build scripts. Source it; do not run it.
#
# Everything built here lives outside the repository, in
# ${VESSEL_CACHE:-$HOME/.cache/vessel}.

VESSEL_CACHE=${VESSEL_CACHE:-${HOME}/.cache/vessel}
GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LINUX_TARBALL=/usr/src/linux-source-6.1.tar.xz
LINUX_SRC=${VESSEL_CACHE}/linux-source-6.1
export VESSEL_CACHE GUEST_DIR LINUX_TARBALL LINUX_SRC

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# pkg_installed PKG: true if dpkg has PKG fully installed.
pkg_installed() {
	[[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

# pkg_version PKG: the installed version of PKG.
pkg_version() {
	dpkg-query -W -f='${Version}' "$1"
}

# ensure_pkgs PKG...: install the Debian packages that are missing.
ensure_pkgs() {
	local missing=() p
	for p in "$@"; do
		pkg_installed "$p" || missing+=("$p")
	done
	((${#missing[@]} == 0)) && return 0
	log "installing ${missing[*]}"
	local sudo=()
	((EUID == 0)) || sudo=(sudo)
	"${sudo[@]}" apt-get update -q
	DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# ensure_qemu: install qemu-system-x86 and qemu-utils as one consistent set.
# The image may ship a newer qemu-utils from bookworm-backports; installing
# bookworm's qemu-system-x86 beside it makes apt remove that qemu-utils
# (their shared qemu-* dependencies must be one version). So when an
# installed qemu-utils came from backports, take qemu-system-x86 from
# backports at exactly that version, adding the backports suite if apt does
# not know it yet.
ensure_qemu() {
	if pkg_installed qemu-system-x86 && pkg_installed qemu-utils &&
		[[ $(pkg_version qemu-system-x86) == "$(pkg_version qemu-utils)" ]]; then
		return 0
	fi
	local sudo=()
	((EUID == 0)) || sudo=(sudo)
	if pkg_installed qemu-utils && [[ $(pkg_version qemu-utils) == *bpo* ]]; then
		local ver
		ver=$(pkg_version qemu-utils)
		local list=/etc/apt/sources.list.d/vessel-bookworm-backports.sources
		if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
			log "adding bookworm-backports to apt (qemu-utils ${ver} came from there)"
			printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' \
				'Suites: bookworm-backports' 'Components: main' \
				'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' |
				"${sudo[@]}" tee "$list" >/dev/null
		fi
		log "installing qemu-system-x86 ${ver} to match the installed qemu-utils"
		"${sudo[@]}" apt-get update -q
		DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends \
			-t bookworm-backports "qemu-system-x86=${ver}" "qemu-utils=${ver}"
	else
		ensure_pkgs qemu-system-x86 qemu-utils
	fi
}

# require_cmds CMD...: fail with one clear line naming every command missing
# after the installs (a package install can succeed and still not provide it,
# or remove another package's command).
require_cmds() {
	local missing=() c
	for c in "$@"; do
		command -v "$c" >/dev/null 2>&1 || missing+=("$c")
	done
	((${#missing[@]} == 0)) || die "commands the tests need are missing after installing: ${missing[*]}"
}

# hash_of FILE... [-- STRING...]: one sha256 over the files' contents and the strings.
hash_of() {
	local a strings=0
	for a in "$@"; do
		if [[ $strings == 0 && $a == -- ]]; then
			strings=1
		elif ((strings)); then
			printf '%s\n' "$a"
		else
			cat -- "$a"
		fi
	done | sha256sum | cut -d' ' -f1
}

# up_to_date STAMP HASH OUTPUT...: true if every output exists and STAMP holds HASH.
up_to_date() {
	local stamp=$1 want=$2 f
	shift 2
	for f in "$@"; do [[ -e $f ]] || return 1; done
	[[ -f $stamp && $(<"$stamp") == "$want" ]]
}

# ensure_linux_src: unpack Debian's linux-source-6.1 into the cache, once.
ensure_linux_src() {
	ensure_pkgs linux-source-6.1 xz-utils
	local ver stamp=${LINUX_SRC}/.vessel-unpacked
	ver=$(pkg_version linux-source-6.1)
	if [[ -f $stamp && $(<"$stamp") == "$ver" ]]; then
		return 0
	fi
	log "unpacking ${LINUX_TARBALL} (${ver}) into ${VESSEL_CACHE}"
	rm -rf "${LINUX_SRC}"
	mkdir -p "${VESSEL_CACHE}"
	tar -C "${VESSEL_CACHE}" -xJf "${LINUX_TARBALL}"
	[[ -f ${LINUX_SRC}/Makefile ]] || die "unexpected layout in ${LINUX_TARBALL}"
	printf '%s\n' "$ver" >"$stamp"
}

# ensure_gen_init_cpio: build the kernel's usr/gen_init_cpio into the cache
# (a single C file; from the unpacked source if build-kernel.sh has run, else
# from the tarball) and print its path. It writes a cpio from a file list, so
# /dev/console goes into an archive without root or mknod.
ensure_gen_init_cpio() {
	local tools=${VESSEL_CACHE}/tools
	local bin=${tools}/gen_init_cpio
	if [[ ! -x $bin ]]; then
		ensure_pkgs gcc libc6-dev xz-utils linux-source-6.1
		mkdir -p "$tools"
		if [[ -f $LINUX_SRC/usr/gen_init_cpio.c ]]; then
			cp "$LINUX_SRC/usr/gen_init_cpio.c" "$tools/gen_init_cpio.c"
		else
			log "extracting usr/gen_init_cpio.c from ${LINUX_TARBALL}"
			tar -xJf "$LINUX_TARBALL" -O linux-source-6.1/usr/gen_init_cpio.c >"$tools/gen_init_cpio.c"
		fi
		cc -O2 -o "$bin" "$tools/gen_init_cpio.c" >&2
	fi
	printf '%s\n' "$bin"
}

# busybox_applet_links ROOT_PREFIX: gen_init_cpio "slink" lines for every
# applet of /bin/busybox, except /bin/busybox itself (never link over it)
# and /init.
busybox_applet_links() {
	/bin/busybox --list-full | sort | while read -r applet; do
		case /$applet in
		/bin/busybox | /init) continue ;;
		esac
		echo "slink /$applet /bin/busybox 0777 0 0"
	done
}

# make_ext4 ROOT OUT SIZE LABEL UUID: a reproducible ext4 image of the
# folder ROOT (fixed UUID, hash seed and timestamps), checked by e2fsck and
# moved into place at OUT only when complete. ROOT's files should already
# have mtime 0 (touch -h -d @0).
make_ext4() {
	local root=$1 out=$2 size=$3 label=$4 uuid=$5
	mkdir -p "$(dirname "$out")"
	rm -f "$out.tmp"
	E2FSPROGS_FAKE_TIME=1 mkfs.ext4 -q -F -L "$label" -U "$uuid" \
		-E "hash_seed=$uuid,root_owner=0:0" -d "$root" "$out.tmp" "$size" >/dev/null
	# mkfs -d copies each file's ctime, which touch cannot set: pin it here.
	(cd "$root" && find . -mindepth 1) | while read -r f; do
		printf 'set_inode_field /%s ctime 0\n' "${f#./}"
	done | E2FSPROGS_FAKE_TIME=1 debugfs -w -f - "$out.tmp" >/dev/null 2>&1
	e2fsck -fn "$out.tmp" >/dev/null 2>&1 || die "e2fsck found errors in $out.tmp"
	mv "$out.tmp" "$out"
}

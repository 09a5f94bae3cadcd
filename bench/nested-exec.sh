#!/usr/bin/env bash
# `vessel exec -- true` under the kvm engine, cold and warm, timed inside
# the nested-KVM environment: QEMU TCG with nested SVM (guest/run-nested.sh,
# built by guest/build-nested.sh). The outer CPU is emulated by TCG, so
# these figures are kvm inside QEMU TCG: far slower than kvm on hardware,
# and only comparable with each other.
#
#   bench/nested-exec.sh [RUNS]    (default 3)
#
# Inside: the static vessel of guest/build-nested.sh, the default guest
# (kernel and initramfs with the agent) as its VESSEL_CACHE. Each run is
# timed with busybox `time` (10 ms resolution), from command to exit:
#   cold:  vessel exec --accel kvm --cold -- true   (a boot to the agent)
#   first: the first warm exec (boot, snapshot, then a clone)
#   warm:  vessel exec --accel kvm -- true          (a clone of the snapshot)
# With --no-jail: the figures are the kvm engine's, not the jail's (set
# NESTED_JAIL=1 to run jailed; the cgroup v2 hierarchy is mounted for it).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
runs=${1:-3}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [RUNS]" >&2; exit 2; }

script=$(cat <<INNER
export VESSEL_CACHE=/tmp/vc TMPDIR=/tmp HOME=/root
mkdir -p /tmp/vc/kernel /sys/fs/cgroup
cp /guest/vmlinux /tmp/vc/kernel/vmlinux
cp /guest/initramfs.cpio.gz /tmp/vc/initramfs.cpio.gz
jail=--no-jail
if [ "${NESTED_JAIL:-0}" = 1 ] && mount -t cgroup2 none /sys/fs/cgroup; then jail=; fi
echo "NESTED-EXEC jail=\${jail:-on} cpus=\$(grep -c ^processor /proc/cpuinfo)"
t() {
  label=\$1; shift
  time -o /tmp/t -p "\$@" >/tmp/o 2>&1; rc=\$?
  echo "NESTED-EXEC \$label \$(grep ^real /tmp/t) rc=\$rc"
  sed "s/^/  \$label: /" /tmp/o | head -5
}
i=0; while [ \$i -lt $runs ]; do t cold vessel exec --accel kvm --cold \$jail -- true; i=\$((i+1)); done
t first vessel exec --accel kvm \$jail -- true
i=0; while [ \$i -lt $runs ]; do t warm vessel exec --accel kvm \$jail -- true; i=\$((i+1)); done
t check vessel exec --accel kvm \$jail -- sh -c 'echo hello-from-kvm'
INNER
)
"$here/../guest/run-nested.sh" -m 2G -- "$script" | tee /tmp/nested-exec.log | grep -E "NESTED-|^  [a-z]+:|error"

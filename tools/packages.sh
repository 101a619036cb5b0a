#!/usr/bin/env bash
# Installs the Debian packages a command of this repository drives, those that are missing:
# `tools/packages.sh tests` (what `.ci/run` needs), `tools/packages.sh bench` (what
# tools/bench/run.sh needs), `tools/packages.sh remote` (tools/bench/remote.sh). One place, so
# the test run and the benchmarks cannot drift apart.
set -euo pipefail

# python3-libnbd: nbdsh, libnbd as a client in Python (tests/wind_down.rs). xfsprogs,
# btrfs-progs: host file systems other than ext4 for the images (tests/host_fs.rs), and
# exfat-fuse with exfatprogs one without hard links (the kernel here has no FAT or exFAT).
# systemd: systemd-socket-activate and systemd-analyze (tests/daemon.rs; no systemd needs to
# run); man-db and groff-base: man and groff render the generated man pages (tests/generate.rs).
tests=(libnbd-bin python3-libnbd xfsprogs btrfs-progs exfat-fuse exfatprogs nbdkit fio fuse3 e2fsprogs qemu-utils openssl systemd man-db groff-base)
# qemu-system-x86 boots a Debian kernel whose nbd module is the client of tests/kernel_client.rs
# (tools/kernel-client/build.py downloads that kernel; nothing of it is installed here).
# Ceph for the object-store tests (tools/ceph/start.sh: mon, OSD, radosgw; the ceph CLI):
# without recommends, which would add ~40 packages (ceph-mgr and its python stack among them).
# ceph-common pulls in sudo, whose prerm refuses removal for a root without a password: purging
# these needs SUDO_FORCE_REMOVE=yes (installing does not care).
ceph=(ceph-mon ceph-osd radosgw ceph-common curl)
# The benchmark: fio drives every peer; qemu-nbd/qemu-img and nbdkit are the peers; nbdfuse
# (libnbd-bin), fuse3 and e2fsprogs carry its ext4 row.
bench=(fio qemu-utils nbdkit libnbd-bin fuse3 e2fsprogs)
# The object-store benchmark: nbdkit's curl plugin is its peer, qemu-io and nbdfuse + ext4 its
# clients, and it starts its own Ceph.
remote=(nbdkit qemu-utils libnbd-bin fuse3 e2fsprogs)

case "${1:-}" in
    tests) plain=("${tests[@]}"); bare=("${ceph[@]}"); vm=(qemu-system-x86) ;;
    bench) plain=("${bench[@]}"); bare=(); vm=() ;;
    remote) plain=("${remote[@]}"); bare=("${ceph[@]}"); vm=() ;;
    *) echo "usage: $0 tests|bench|remote" >&2; exit 2 ;;
esac

missing() {
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || echo "$p"
    done
}
mapfile -t plain_missing < <(missing "${plain[@]}")
mapfile -t bare_missing < <(missing "${bare[@]+"${bare[@]}"}")
mapfile -t vm_missing < <(missing "${vm[@]+"${vm[@]}"}")
if [ ${#plain_missing[@]} -eq 0 ] && [ ${#bare_missing[@]} -eq 0 ] && [ ${#vm_missing[@]} -eq 0 ]; then
    exit 0
fi
t0=$EPOCHREALTIME
# These machines come with qemu-utils from bookworm-backports. Installing bookworm's own
# qemu-system-x86 beside it would remove it (their common files conflict), so qemu-system-x86
# then comes from backports, of the very version of the qemu-utils there.
vm_install=("${vm_missing[@]+"${vm_missing[@]}"}")
qemu_utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if [ ${#vm_missing[@]} -gt 0 ] && [[ "$qemu_utils" == *~bpo* ]]; then
    src=/etc/apt/sources.list.d/cowdisk-backports.sources
    if [ ! -e "$src" ]; then
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$src"
    fi
    vm_install=(-t bookworm-backports "${vm_missing[@]/%/=$qemu_utils}")
fi
apt-get update -qq
if [ ${#plain_missing[@]} -gt 0 ]; then
    echo "installing: ${plain_missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${plain_missing[@]}" >/dev/null
fi
if [ ${#bare_missing[@]} -gt 0 ]; then
    echo "installing: ${bare_missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${bare_missing[@]}" >/dev/null
fi
if [ ${#vm_missing[@]} -gt 0 ]; then
    echo "installing: ${vm_install[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${vm_install[@]}" >/dev/null
fi
echo "installed in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"

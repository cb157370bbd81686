#!/bin/bash
# Build the virtual host's base root for the kexec end-to-end test (issues 8 and 16).
#
#   build-vhost.sh [trixie|bookworm]      (default: trixie)
#
# Output: ${CPRD_GUEST_CACHE:-/var/cache/cprd-test}/vhost[-trixie]-<hash>/{root/,vmlinuz,
# initrd.img,kver} where <hash> is the first 16 hex digits of the sha256 of this script
# and the release (bookworm keeps the plain "vhost-" prefix). Idempotent: a complete
# directory is reused. The directory path is the last line of stdout.
#
# root/ is a Debian tree (debootstrap) with systemd as PID 1, the Debian kernel and an
# initramfs (initramfs-tools, MODULES=most: virtio_blk + ext4 for a root on /dev/vda),
# QEMU 10, kexec-tools, python3 and dbus:
# - bookworm (Debian 12, systemd 252): QEMU from bookworm-backports, and python3-yaml
#   and python3-systemd (the .deb vendors the rest).
# - trixie (Debian 13, systemd 257): QEMU from trixie, and trixie-backports in the
#   sources; cprd's Python dependencies are NOT in the base: `apt-get install ./cprd.deb`
#   pulls them from Debian when the host disk is made (scripts/kexec_e2e.py).
# cprd itself is NOT in it: kexec_e2e.py installs the project's .deb into a copy for
# each run, so that the cached base does not go stale when cprd changes.
set -euo pipefail

log() { printf 'build-vhost: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

DIST=${1:-trixie}
SELF=$(readlink -f "${BASH_SOURCE[0]}")
HASH=$( (cat "$SELF" && echo "$DIST") | sha256sum | cut -c1-16)
CACHE=${CPRD_GUEST_CACHE:-/var/cache/cprd-test}
case $DIST in
bookworm)
	OUT="$CACHE/vhost-$HASH"
	EXTRA=python3-yaml,python3-systemd
	;;
trixie)
	OUT="$CACHE/vhost-trixie-$HASH"
	EXTRA=qemu-system-x86,qemu-utils
	;;
*) die "unknown release $DIST (trixie or bookworm)" ;;
esac
MIRROR=${CPRD_DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [[ -f $OUT/done ]]; then
	log "cached: $OUT"
	echo "$OUT"
	exit 0
fi
[[ $EUID -eq 0 ]] || die "must run as root"
command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"

mkdir -p "$CACHE"
STAGE=$(mktemp -d "$CACHE/.vhost-$HASH.tmp.XXXXXX")
ROOT=$STAGE/root
mounted=()
cleanup() {
	local m
	for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
	rm -rf "$STAGE"
}
trap cleanup EXIT
start=$(date +%s)

log "debootstrap $DIST into $ROOT"
debootstrap --variant=minbase \
	--include=systemd,systemd-sysv,udev,dbus,kmod,e2fsprogs,procps,python3,kexec-tools,initramfs-tools,ca-certificates \
	"$DIST" "$ROOT" "$MIRROR" >&2

in_root() { chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
for m in proc sys dev; do
	mount --bind "/$m" "$ROOT/$m"
	mounted=("$ROOT/$m" "${mounted[@]}")
done

cat >"$ROOT/etc/apt/sources.list.d/$DIST-backports.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: $DIST-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
# kexec-tools must not load its own kernel at shutdown (it would replace cprdctl's).
echo 'kexec-tools kexec-tools/load_kexec boolean false' | in_root debconf-set-selections
# Policy: nothing starts in the chroot.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"

in_root apt-get update -qq >&2
log "kernel + initramfs, ${EXTRA//,/ }"
in_root apt-get install -y -qq --no-install-recommends linux-image-amd64 ${EXTRA//,/ } >&2
if [[ $DIST == bookworm ]]; then
	log "QEMU from bookworm-backports"
	in_root apt-get install -y -qq --no-install-recommends -t bookworm-backports \
		qemu-system-x86 qemu-utils >&2
fi
in_root apt-get clean
rm -f "$ROOT/usr/sbin/policy-rc.d"
sed -i 's/^LOAD_KEXEC=.*/LOAD_KEXEC=false/' "$ROOT/etc/default/kexec" 2>/dev/null || true

# Boot quickly and quietly: no timers, no getty on tty1, root without a password.
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
	e2scrub_reap.service fstrim.timer getty@tty1.service systemd-timesyncd.service \
	kexec-load.service kexec.service >/dev/null 2>&1 || true
in_root passwd -d root >/dev/null
echo vhost >"$ROOT/etc/hostname"
echo '/dev/vda / ext4 defaults,errors=remount-ro 0 1' >"$ROOT/etc/fstab"
# The legacy pmem region (memmap=256M!1G): nd_e820 + nd_pmem give /dev/pmem0.
printf 'libnvdimm\nnd_btt\nnd_pmem\nnd_e820\n' >"$ROOT/etc/modules-load.d/pmem.conf"
mkdir -p "$ROOT/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=persistent\n' >"$ROOT/etc/systemd/journald.conf.d/e2e.conf"

KVER=$(basename "$(ls -d "$ROOT"/lib/modules/* | head -n1)")
[[ -f $ROOT/boot/vmlinuz-$KVER && -f $ROOT/boot/initrd.img-$KVER ]] ||
	die "no kernel/initramfs for $KVER in $ROOT/boot"
cp "$ROOT/boot/vmlinuz-$KVER" "$STAGE/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$STAGE/initrd.img"
echo "$KVER" >"$STAGE/kver"
chroot "$ROOT" qemu-system-x86_64 --version | head -n1 >"$STAGE/qemu-version"

for m in "${mounted[@]}"; do umount -l "$m"; done
mounted=()
touch "$STAGE/done"
chmod 755 "$STAGE"
rm -rf "$OUT"
mv -T "$STAGE" "$OUT"
log "built in $(($(date +%s) - start)) s: $(du -sh "$OUT/root" | cut -f1), kernel $KVER, $(cat "$OUT/qemu-version")"
echo "$OUT"

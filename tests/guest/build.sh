#!/bin/bash
# Build the cprd test guest (kernel + busybox initramfs with qemu-ga) from Debian packages.
#
# Output: ${CPRD_GUEST_CACHE:-/var/cache/cprd-test}/guest-<hash>/{vmlinuz,initrd.img}
# where <hash> is the first 16 hex digits of the sha256 of this script (the only file
# under tests/guest/ that it reads). Idempotent: if that directory is complete, nothing is
# built. The directory path is always the last line of stdout; everything else goes to
# stderr.
#
# Needs: apt-get (with package lists), dpkg-deb, busybox-static, qemu-guest-agent, cpio,
# gzip, ldd; xz/zstd only if the kernel's modules are compressed.
#
# Guest behaviour (/init):
#   - mounts proc, sys, devtmpfs, /tmp (tmpfs)
#   - insmods the virtio modules (no modules.dep, fixed order)
#   - saves the chipset's ACPI PM I/O base and enable registers; pm-suspend (what qemu-ga's
#     guest-suspend-ram runs) restores them around every suspend, because QEMU's wake-up
#     resets them and without that only the first suspend would work
#   - if a virtio console device exists: starts `qemu-ga -m virtio-serial -p /dev/vport0p1`
#     in the background and waits until it holds the port open
#   - kernel argument cprd.agent=<mode>,<good> (tests only): instead of qemu-ga, runs
#     cprd-hostile-agent, a busybox shell agent on /dev/vport0p1 that answers the first
#     <good> requests correctly (guest-sync echoes its id as {"return": ID}, guest-ping
#     {"return": {}}; a preflight ping is 2 requests: guest-sync, guest-ping) and every later
#     guest-sync or guest-ping with a hostile reply, by <mode>:
#       longline  one line of 4 MiB           endless  bytes without a newline, forever
#       deep      [[[[... 100000 deep          errint   {"error": 1}
#       badutf8   invalid UTF-8, then newline  drip     a valid reply, one byte a second
#     Other commands (guest-suspend-ram) get no reply; each request is logged on ttyS0.
#     Without the argument (the default) the guest runs the real qemu-ga.
#   - kernel argument cprd.fill=<MiB>: fills a tmpfs with that much /dev/urandom data
#   - kernel argument cprd.dirty=<MiB>: keeps rewriting that much guest memory (a tmpfs
#     file copied over from a random pattern, in a loop, forever), so that a live save
#     always finds pages dirtied since its last pass
#   - prints `cprd-guest-ready`, then `cprd-tick N` (N = 1, 2, ...) every second, forever,
#     on /dev/ttyS0.
set -euo pipefail

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

SELF=$(readlink -f "${BASH_SOURCE[0]}")
HASH=$(sha256sum <"$SELF" | cut -c1-16)
CACHE=${CPRD_GUEST_CACHE:-/var/cache/cprd-test}
OUT="$CACHE/guest-$HASH"

if [[ -f $OUT/vmlinuz && -f $OUT/initrd.img ]]; then
	log "cached: $OUT"
	echo "$OUT"
	exit 0
fi

MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console)

for tool in apt-get apt-cache dpkg-deb cpio gzip ldd sha256sum; do
	command -v "$tool" >/dev/null || die "missing tool: $tool"
done
BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || die "$BUSYBOX missing (apt-get install busybox-static)"
"$BUSYBOX" true || die "$BUSYBOX does not run"
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is not static (install busybox-static)"; fi
QGA=/usr/sbin/qemu-ga
[[ -x $QGA ]] || die "$QGA missing (apt-get install qemu-guest-agent)"

mkdir -p "$CACHE"
WORK=$(mktemp -d /tmp/cprd-guest-build.XXXXXX)
STAGE=$(mktemp -d "$CACHE/.guest-$HASH.tmp.XXXXXX")
cleanup() { rm -rf "$WORK" "$STAGE"; }
trap cleanup EXIT

start=$(date +%s)

# --- kernel --------------------------------------------------------------------------
KPKG=$(apt-cache depends linux-image-amd64 |
	sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
[[ -n $KPKG ]] || die "cannot resolve the kernel package that linux-image-amd64 depends on"
log "kernel package: $KPKG"
mkdir -p "$WORK/dl" "$WORK/kernel"
# apt drops privileges to _apt for downloads; give it a directory it may write to.
if id _apt >/dev/null 2>&1; then
	chmod 755 "$WORK"
	chown _apt "$WORK/dl"
fi
(cd "$WORK/dl" && apt-get download -q "$KPKG" >&2) || die "apt-get download $KPKG failed"
dpkg-deb -x "$WORK"/dl/"$KPKG"_*.deb "$WORK/kernel"
VMLINUZ=$(find "$WORK/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
[[ -n $VMLINUZ ]] || die "no boot/vmlinuz-* in $KPKG"
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR="$WORK/kernel/lib/modules/$KVER"
[[ -d $MODDIR ]] || MODDIR="$WORK/kernel/usr/lib/modules/$KVER"
[[ -d $MODDIR ]] || die "no module directory for $KVER"
log "kernel version: $KVER"

# --- initramfs tree ------------------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,var,fill,dirty,etc,lib/modules}
ln -s ../run "$ROOT/var/run"
chmod 1777 "$ROOT/tmp"

# busybox with a symlink per applet
cp "$BUSYBOX" "$ROOT/bin/busybox"
while read -r applet; do
	[[ -z $applet || $applet == bin/busybox ]] && continue
	mkdir -p "$ROOT/$(dirname "$applet")"
	[[ -e $ROOT/$applet ]] || ln -s /bin/busybox "$ROOT/$applet"
done < <("$BUSYBOX" --list-full)

# virtio modules, decompressed (busybox insmod reads plain .ko only)
for m in "${MODULES[@]}"; do
	f=$(find "$MODDIR/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \
		-o -name "$m.ko.gz" | head -n1)
	if [[ -z $f ]]; then
		if grep -q "/$m.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; then
			log "module $m is built in"
			continue
		fi
		die "module $m not found in $KPKG"
	fi
	log "module: ${f#"$MODDIR"/}"
	case $f in
	*.ko.xz) xz -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
	*.ko.zst) zstd -qdc "$f" >"$ROOT/lib/modules/$m.ko" ;;
	*.ko.gz) gzip -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
	*) cp "$f" "$ROOT/lib/modules/$m.ko" ;;
	esac
done

# qemu-ga with its shared libraries (recursively) and the dynamic loader
cp "$QGA" "$ROOT/usr/sbin/qemu-ga"
declare -A seen=()
queue=("$QGA")
while ((${#queue[@]})); do
	bin=${queue[0]}
	queue=("${queue[@]:1}")
	while read -r lib; do
		[[ -n $lib && -z ${seen[$lib]:-} ]] || continue
		seen[$lib]=1
		mkdir -p "$ROOT$(dirname "$lib")"
		cp -L "$lib" "$ROOT$lib"
		queue+=("$lib")
	done < <(ldd "$bin" 2>/dev/null | awk '
		$2 == "=>" && $3 ~ /^\// { print $3 }
		$1 ~ /^\// { print $1 }')
done
((${#seen[@]})) || die "ldd found no libraries for $QGA"
log "qemu-ga libraries: ${!seen[*]}"

# pm-utils stand-ins: qemu-ga's guest-suspend-ram does nothing without them
cat >"$ROOT/usr/sbin/pm-is-supported" <<'EOF'
#!/bin/sh
exit 0
EOF
cat >"$ROOT/usr/sbin/pm-suspend" <<'EOF'
#!/bin/sh
# Put the ACPI PM registers back before suspending and after waking (see cprd-acpi-regs).
cprd-acpi-regs restore
echo mem > /sys/power/state
rc=$?
cprd-acpi-regs restore
exit $rc
EOF
# QEMU wakes an x86 guest from S3 by resetting the machine, which puts the chipset's ACPI
# PM I/O base and enable bit back to their defaults (q35: ICH9 LPC 00:1f.0 PMBASE 0x40,
# ACPI_CNTL 0x44; pc: PIIX4 PM 00:01.3 PMBASE 0x40, PMREGMISC 0x80). SeaBIOS's resume path
# does not program them again and Linux does not restore them (they lie past the standard
# config header), so after the first wake-up PM1_CNT is unmapped: the next S3 write is
# lost, WAK_STS reads as all-ones and the kernel "resumes" at once without ever
# suspending. /init saves the boot values; pm-suspend writes them back.
cat >"$ROOT/usr/sbin/cprd-acpi-regs" <<'EOF'
#!/bin/sh
# cprd-acpi-regs save|restore
dir=/run/cprd-acpi-regs
dev=
en=
for d in /sys/bus/pci/devices/*; do
	case "$(cat "$d/vendor" 2>/dev/null):$(cat "$d/device" 2>/dev/null)" in
	0x8086:0x2918) dev=$d en=68 ;;  # ICH9 LPC: ACPI_CNTL
	0x8086:0x7113) dev=$d en=128 ;; # PIIX4 PM: PMREGMISC
	esac
done
[ -n "$dev" ] || exit 0
cfg=$dev/config
case $1 in
save)
	mkdir -p "$dir" &&
		dd if="$cfg" of="$dir/base" bs=4 skip=16 count=1 2>/dev/null &&
		dd if="$cfg" of="$dir/en" bs=1 skip="$en" count=1 2>/dev/null
	;;
restore)
	[ -f "$dir/base" ] && [ -f "$dir/en" ] || exit 0
	dd if="$cfg" of="$dir/cur" bs=4 skip=16 count=1 2>/dev/null
	cmp -s "$dir/base" "$dir/cur" ||
		dd if="$dir/base" of="$cfg" bs=4 seek=16 count=1 conv=notrunc 2>/dev/null
	dd if="$cfg" of="$dir/cur" bs=1 skip="$en" count=1 2>/dev/null
	cmp -s "$dir/en" "$dir/cur" ||
		dd if="$dir/en" of="$cfg" bs=1 seek="$en" count=1 conv=notrunc 2>/dev/null
	;;
*)
	echo "usage: cprd-acpi-regs save|restore" >&2
	exit 2
	;;
esac
EOF
# A guest agent that turns hostile (cprd.agent=<mode>,<good>): real bytes from a real guest
# over virtio-serial, for the tests of cprd's budget for untrusted agent input.
cat >"$ROOT/usr/sbin/cprd-hostile-agent" <<'EOF'
#!/bin/sh
# cprd-hostile-agent MODE GOOD (see build.sh's header)
mode=$1
good=$2
n=0
exec 3<>/dev/vport0p1
reply() { printf '%s\n' "$1" >&3; }
hostile() { # $1: the id of a guest-sync, or 0
	case $mode in
	longline) {
		printf '{"return": "'
		head -c 4194304 /dev/zero | tr '\0' a
		printf '"}\n'
	} >&3 ;;
	# never returns; its writes block (no spinning) while no host client is connected
	endless) tr '\0' x </dev/zero >&3 ;;
	deep) {
		head -c 100000 /dev/zero | tr '\0' '['
		echo
	} >&3 ;;
	errint) reply '{"error": 1}' ;;
	badutf8) printf '\377\376\300\257{"return": \355\240\200 "\300"}\n' >&3 ;;
	drip)
		s="{\"return\": $1}"
		while [ -n "$s" ]; do
			rest=${s#?}
			printf '%s' "${s%"$rest"}" >&3
			s=$rest
			sleep 1
		done
		echo >&3
		;;
	*) reply '{"error": {"class": "GenericError", "desc": "unknown hostile mode"}}' ;;
	esac
}
while :; do
	# EOF while no host client is connected: look again soon (sleep is a fork and an
	# exec in busybox sh: not too often, it costs a TCG guest dearly)
	if ! IFS= read -r line <&3; then
		sleep 0.5
		continue
	fi
	case $line in
	*'"guest-sync"'*)
		id=${line##*\"id\": }
		id=${id%%\}*}
		case $id in '' | *[!0-9]*) id=0 ;; esac
		;;
	*'"guest-ping"'*) id= ;;
	*) continue ;; # guest-suspend-ram and others: no reply (qemu-ga's on success)
	esac
	n=$((n + 1))
	echo "cprd-hostile-agent: request $n: ${line%%,*}" >&2
	if [ "$n" -gt "$good" ]; then
		hostile "${id:-0}"
	elif [ -n "$id" ]; then
		reply "{\"return\": $id}"
	else
		reply '{"return": {}}'
	fi
done
EOF
chmod 755 "$ROOT/usr/sbin/pm-is-supported" "$ROOT/usr/sbin/pm-suspend" \
	"$ROOT/usr/sbin/cprd-acpi-regs" "$ROOT/usr/sbin/cprd-hostile-agent"

echo "root:x:0:0:root:/:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"
echo "$KPKG $KVER" >"$ROOT/etc/cprd-guest"

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
exec </dev/console >/dev/console 2>&1
say() { echo "$*" > /dev/ttyS0; }

for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console; do
	[ -f /lib/modules/$m.ko ] || continue
	insmod /lib/modules/$m.ko || say "cprd-guest: insmod $m failed"
done

fill=0
dirty=0
agent_mode=
for arg in $(cat /proc/cmdline); do
	case $arg in
	cprd.fill=*) fill=${arg#cprd.fill=} ;;
	cprd.dirty=*) dirty=${arg#cprd.dirty=} ;;
	cprd.agent=*) agent_mode=${arg#cprd.agent=} ;;
	esac
done

# The chipset's ACPI PM registers as the firmware set them, for pm-suspend to restore.
cprd-acpi-regs save || say "cprd-guest: cannot save the ACPI PM registers"

# The agent only if the VM has a virtio console device (virtio device id 3).
has_console=0
for d in /sys/bus/virtio/devices/*; do
	[ "$(cat $d/device 2>/dev/null)" = 0x0003 ] && has_console=1
done
if [ $has_console = 1 ]; then
	i=0
	while [ ! -c /dev/vport0p1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
	if [ -c /dev/vport0p1 ]; then
		if [ -n "$agent_mode" ]; then
			cprd-hostile-agent "${agent_mode%%,*}" "${agent_mode#*,}" 2>/dev/ttyS0 &
		else
			qemu-ga -m virtio-serial -p /dev/vport0p1 -t /run 2>/dev/ttyS0 &
		fi
		qga=$!
		# ready once the agent holds the port open
		i=0
		while [ $i -lt 100 ]; do
			ls -l /proc/$qga/fd 2>/dev/null | grep -q vport0p1 && break
			sleep 0.1
			i=$((i + 1))
		done
		[ $i -lt 100 ] || say "cprd-guest: the agent did not open /dev/vport0p1"
	else
		say "cprd-guest: /dev/vport0p1 did not appear"
	fi
fi

if [ "$fill" -gt 0 ] 2>/dev/null; then
	mount -t tmpfs -o size=$((fill + 4))m tmpfs /fill
	dd if=/dev/urandom of=/fill/data bs=1M count=$fill 2>/dev/null || say "cprd-guest: fill failed"
fi

if [ "$dirty" -gt 0 ] 2>/dev/null; then
	mount -t tmpfs -o size=$((2 * dirty + 4))m tmpfs /dirty
	dd if=/dev/urandom of=/dirty/pattern bs=1M count=$dirty 2>/dev/null || say "cprd-guest: dirty failed"
	(while :; do dd if=/dirty/pattern of=/dirty/data bs=1M conv=notrunc 2>/dev/null; done) &
	renice -n 19 -p $! >/dev/null # the ticks and the agent go first
	say "cprd-guest: dirtying $dirty MiB"
fi

say cprd-guest-ready
n=0
while :; do
	n=$((n + 1))
	say "cprd-tick $n"
	sleep 1
done
EOF
chmod 755 "$ROOT/init"

if [[ $EUID -eq 0 ]]; then
	mknod -m 600 "$ROOT/dev/console" c 5 1
	mknod -m 666 "$ROOT/dev/null" c 1 3
fi

# --- pack ----------------------------------------------------------------------------
cp "$VMLINUZ" "$STAGE/vmlinuz"
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z |
	cpio --null -o -H newc --quiet -R 0:0 | gzip -6 >"$STAGE/initrd.img")
echo "$KPKG $KVER" >"$STAGE/kernel-package"
chmod 755 "$STAGE"
chmod 644 "$STAGE"/*

# Atomic publish; if another build won the race, keep its result.
if ! mv -T "$STAGE" "$OUT" 2>/dev/null; then
	if [[ -f $OUT/vmlinuz && -f $OUT/initrd.img ]]; then
		log "another build finished first: $OUT"
	else
		log "replacing incomplete $OUT"
		rm -rf "$OUT"
		mv -T "$STAGE" "$OUT"
	fi
fi
log "built in $(($(date +%s) - start)) s: $(du -h "$OUT/initrd.img" | cut -f1) initrd"
echo "$OUT"

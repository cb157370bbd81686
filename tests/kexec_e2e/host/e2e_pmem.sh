#!/bin/sh
# cprd-e2e-pmem.service: /dev/pmem0 (the legacy region of memmap=256M!1G) as a DAX ext4 on
# /mnt/pmem, before cprd-restore.service. mkfs only on the first boot of a run (no phase
# file yet); after the kexec the filesystem, and vm1's RAM file on it, must still be there.
set -u
say() { echo "E2E-PMEM $*" >/dev/ttyS0; echo "$*"; }
for m in libnvdimm nd_btt nd_pmem nd_e820; do modprobe "$m" || say "modprobe $m failed"; done
i=0
while [ ! -b /dev/pmem0 ] && [ $i -lt 300 ]; do
	sleep 0.1
	i=$((i + 1))
done
if [ ! -b /dev/pmem0 ]; then
	say "error: no /dev/pmem0"
	exit 1
fi
mkdir -p /mnt/pmem
if [ ! -e /var/lib/cprd-e2e/phase ]; then
	say "first boot: mkfs.ext4 /dev/pmem0"
	mkfs.ext4 -q -F -b 4096 -L e2e-pmem /dev/pmem0 || exit 1
fi
if ! mount -o dax=always /dev/pmem0 /mnt/pmem; then
	say "error: mount -o dax=always /dev/pmem0 failed: $(dmesg | grep -i dax | tail -n 2 | tr '\n' ' ')"
	exit 1
fi
say "mounted: $(grep ' /mnt/pmem ' /proc/mounts) files: $(ls -l /mnt/pmem | tr '\n' ' ')"

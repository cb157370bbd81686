#!/bin/bash
# The Debian 13 (trixie) build root for the native package: packaging/build-root.sh
#
# Output: ${CPRD_GUEST_CACHE:-/var/cache/cprd-test}/debroot-trixie-<hash>/root, a trixie
# tree (debootstrap minbase, then apt: build-essential, debhelper, dh-python,
# pybuild-plugin-pyproject, python3-all, python3-setuptools, lintian) with
# trixie-backports in its sources. <hash>: the first 16 hex digits of this script's
# sha256. Idempotent: a complete root is reused. The directory is the last line of
# stdout. Needs root, debootstrap and Debian's mirror (deb.debian.org) the first time.
set -euo pipefail

log() { printf 'build-root: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

SELF=$(readlink -f "${BASH_SOURCE[0]}")
HASH=$(sha256sum <"$SELF" | cut -c1-16)
CACHE=${CPRD_GUEST_CACHE:-/var/cache/cprd-test}
OUT="$CACHE/debroot-trixie-$HASH"
MIRROR=${CPRD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILD_DEPS=(build-essential dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian)

if [[ -f $OUT/done ]]; then
	log "cached: $OUT"
	echo "$OUT"
	exit 0
fi
[[ $EUID -eq 0 ]] || die "must run as root"
command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"

mkdir -p "$CACHE"
STAGE=$(mktemp -d "$CACHE/.debroot-trixie-$HASH.tmp.XXXXXX")
ROOT=$STAGE/root
mounted=()
cleanup() {
	local m
	for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
	rm -rf "$STAGE"
}
trap cleanup EXIT
start=$(date +%s)

# debootstrap's own resolver does not follow virtual packages (lintian's
# libnet-ssleay-perl needs perl-openssl-abi-3): only the base here, apt does the rest.
log "debootstrap trixie into $ROOT"
debootstrap --variant=minbase --include=ca-certificates trixie "$ROOT" "$MIRROR" >&2
mount --bind /proc "$ROOT/proc"
mounted=("$ROOT/proc")
cat >"$ROOT/etc/apt/sources.list.d/trixie-backports.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
in_root() { chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
in_root apt-get update -qq >&2
log "build dependencies: ${BUILD_DEPS[*]}"
in_root apt-get install -y -qq --no-install-recommends "${BUILD_DEPS[@]}" >&2
in_root apt-get clean
in_root useradd --system --no-create-home --home-dir /nonexistent builder
umount -l "$ROOT/proc"
mounted=()
touch "$STAGE/done"
chmod 755 "$STAGE"
rm -rf "$OUT"
mv -T "$STAGE" "$OUT"
log "built in $(($(date +%s) - start)) s: $(du -sh "$OUT/root" | cut -f1)"
echo "$OUT"

#!/bin/bash
# Build the cprd .deb: packaging/build-deb.sh [--dist trixie|bookworm] [OUTDIR]
#                                                  (default OUTDIR: build/deb)
# Two packages from the same tree (README: "Install on Debian 13 / Debian 12"):
#
# - trixie (Debian 13): packaging/trixie/debian, a native package the Debian way
#   (dh-python/pybuild into Debian's Python 3.13, Architecture: all, every library a
#   Debian package). Built in a trixie root (packaging/build-root.sh, cached), whose
#   lintian then checks it: any error or warning fails the build.
# - bookworm (Debian 12): packaging/bookworm/debian, cprd plus the libraries Debian 12
#   lacks (qemu.qmp, dbus-fast) vendored in /usr/lib/cprd/python. Built on this machine
#   (it must be Debian 12 with the Build-Depends: scripts/setup.sh) and needs PyPI.
#
# --dist (or $DIST) picks; without it, this machine's release when it is one of the two,
# else trixie. Copies the project (the files git knows about, tracked or new but not
# ignored; the work tree minus .venv and caches without git) into a temporary
# directory, puts the chosen debian/ there as ./debian, runs `dpkg-buildpackage -us -uc
# -b`, and moves the .deb (and .buildinfo/.changes) into OUTDIR. The last line says
# which it built.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
dist=${DIST:-}
if [[ ${1:-} == --dist ]]; then
	dist=$2
	shift 2
elif [[ ${1:-} == --dist=* ]]; then
	dist=${1#--dist=}
	shift
fi
if [[ -z $dist ]]; then
	dist=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	[[ $dist == bookworm || $dist == trixie ]] || dist=trixie
fi
case $dist in
trixie) release="Debian 13 (trixie)" ;;
bookworm) release="Debian 12 (bookworm)" ;;
*)
	echo "build-deb: error: --dist $dist: expected trixie or bookworm" >&2
	exit 2
	;;
esac
out=${1:-$top/build/deb}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [[ $dist == trixie ]]; then
	[[ $EUID -eq 0 ]] || {
		echo "build-deb: error: the trixie build runs in a chroot: run as root" >&2
		exit 1
	}
	broot=$(bash "$here/build-root.sh" | tail -n1)/root
	mkdir -p "$broot/build"
	work=$(mktemp -d "$broot/build/cprd-deb.XXXXXX")
else
	work=$(mktemp -d "${TMPDIR:-/tmp}/cprd-deb.XXXXXX")
fi
trap 'rm -rf "$work"' EXIT
src=$work/cprd
mkdir "$src"

if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	# Tracked and untracked-but-not-ignored files that exist (a deleted file stays
	# listed until committed).
	git -C "$top" ls-files -z --cached --others --exclude-standard |
		(cd "$top" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) |
		tar -C "$top" --null -T - -cf - | tar -C "$src" -xf -
else
	tar -C "$top" --exclude=./.venv --exclude=./.git --exclude=__pycache__ \
		--exclude=.pytest_cache --exclude=.mypy_cache --exclude=.ruff_cache \
		--exclude='*.egg-info' --exclude=./build -cf - . | tar -C "$src" -xf -
fi
rm -rf "$src/debian"
cp -a "$top/packaging/$dist/debian" "$src/debian"

if [[ $dist == trixie ]]; then
	# In a private mount namespace: the /proc bind mount goes away with it.
	inner=/build/$(basename "$work")
	unshare --mount --propagation private sh -euc '
		mount --bind /proc "$1/proc"
		chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
			HOME=/nonexistent sh -euc "
				cd $2/cprd && dpkg-buildpackage -us -uc -b
				cd $2 && lintian --fail-on error,warning --show-overrides cprd_*.deb
			"
	' sh "$broot" "$inner"
else
	(cd "$src" && dpkg-buildpackage -us -uc -b)
fi

shopt -s nullglob
files=("$work"/cprd_*.deb "$work"/cprd-dbgsym_*.deb "$work"/cprd_*.buildinfo "$work"/cprd_*.changes)
mv -f "${files[@]}" "$out"/
for f in "${files[@]}"; do echo "build-deb: $out/$(basename "$f")"; done
echo "build-deb: built $(basename "${files[0]}") for $release"

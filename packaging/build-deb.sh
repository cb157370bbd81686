#!/bin/bash
# Build the cprd .deb: packaging/build-deb.sh [OUTDIR]   (default OUTDIR: build/deb)
#
# Copies the project (the files git knows about, tracked or new but not ignored; the
# work tree minus .venv and caches without git) into a temporary directory, puts
# packaging/debian there as ./debian, runs `dpkg-buildpackage -us -uc -b`, and moves the
# .deb (and .buildinfo/.changes) into OUTDIR. Needs the Build-Depends (scripts/setup.sh
# installs them) and PyPI for the vendored libraries (see debian/rules).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
out=${1:-$top/build/deb}
mkdir -p "$out"
out=$(cd "$out" && pwd)

work=$(mktemp -d "${TMPDIR:-/tmp}/cprd-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
src=$work/cprd
mkdir "$src"

if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and untracked-but-not-ignored files that exist (a deleted file stays
    # listed until committed).
    git -C "$top" ls-files -z --cached --others --exclude-standard \
        | (cd "$top" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
        | tar -C "$top" --null -T - -cf - | tar -C "$src" -xf -
else
    tar -C "$top" --exclude=./.venv --exclude=./.git --exclude=__pycache__ \
        --exclude=.pytest_cache --exclude=.mypy_cache --exclude=.ruff_cache \
        --exclude='*.egg-info' --exclude=./build -cf - . | tar -C "$src" -xf -
fi
rm -rf "$src/debian"
cp -a "$top/packaging/debian" "$src/debian"

(cd "$src" && dpkg-buildpackage -us -uc -b)

shopt -s nullglob
files=("$work"/cprd_*.deb "$work"/cprd-dbgsym_*.deb "$work"/cprd_*.buildinfo "$work"/cprd_*.changes)
mv -f "${files[@]}" "$out"/
for f in "${files[@]}"; do echo "build-deb: $out/$(basename "$f")"; done

#!/bin/bash
# Idempotent setup for a Debian 12 machine, as root: system packages (QEMU 10 from
# bookworm-backports), the project's virtualenv, and the test guest.
# Each step checks first and skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CPRD_VENV:-.venv}
say() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (installs Debian packages)" >&2
    exit 1
fi

# --- Debian packages -------------------------------------------------------
BACKPORTS=/etc/apt/sources.list.d/cprd-bookworm-backports.sources
PKGS=(busybox-static cpio dbus libsystemd-dev pkg-config kexec-tools gcc make
      python3-venv python3-dev systemd iproute2 util-linux e2fsprogs
      build-essential dpkg-dev debhelper python3-pip lintian man-db groff-base
      python3-yaml python3-systemd debootstrap tmux
      python3-prometheus-client)  # tests: parse the metrics file (also in the venv's dev deps)
# libvirt only for the test that a libvirt-run QEMU is refused naming libvirt (issue 13).
BPO_PKGS=(qemu-system-x86 qemu-utils qemu-guest-agent libvirt-daemon-driver-qemu libvirt-clients)

need_bpo=0
if ! qemu-system-x86_64 --version 2>/dev/null | grep -qE 'version (1[0-9]|9\.[1-9])\.'; then
    need_bpo=1
fi
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
for p in "${BPO_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_bpo=1
done

if [ "$need_bpo" = 1 ] || [ ${#missing[@]} -gt 0 ]; then
    if [ ! -f "$BACKPORTS" ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        say "adding bookworm-backports"
        cat > "$BACKPORTS" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    say "apt-get update"
    apt-get update -qq
    export DEBIAN_FRONTEND=noninteractive
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]}"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [ "$need_bpo" = 1 ]; then
        say "installing QEMU 10 from bookworm-backports"
        apt-get install -y -qq --no-install-recommends -t bookworm-backports "${BPO_PKGS[@]}" >/dev/null
    fi
else
    say "Debian packages present"
fi

# --- virtualenv --------------------------------------------------------------
stamp="$VENV/.cprd-setup-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    say "creating virtualenv $VENV"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e '.[dev]'
    rm -f "$VENV"/.cprd-setup-*
    touch "$stamp"
else
    say "virtualenv up to date"
fi

# --- accounts -----------------------------------------------------------------
# The group whose members may read cprd's state over D-Bus, and a test user in it.
getent group cprd >/dev/null || groupadd --system cprd
id -u cprd-test >/dev/null 2>&1 || useradd --system --no-create-home --home-dir=/nonexistent \
    --shell=/usr/sbin/nologin --gid=nogroup --groups=cprd cprd-test
id -nG cprd-test | grep -qw cprd || usermod --append --groups=cprd cprd-test

# --- test guest ------------------------------------------------------------
tests/guest/build.sh

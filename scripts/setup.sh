#!/usr/bin/env bash
# Set up a fresh machine for tremus: system packages, then the package itself
# (which compiles the native helper and the micro-VM guest).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=()
command -v gcc >/dev/null || need+=(gcc)
command -v objcopy >/dev/null || need+=(binutils)
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v modprobe >/dev/null || need+=(kmod)
# The ownership arbiter's tests run a real etcd cluster (Debian's etcd 3.4).
[ -x /usr/bin/etcd ] || need+=(etcd-server)
# hash64 (tremus/native/hash.c) is XXH3-64 from the system's xxHash library.
dpkg -s libxxhash-dev >/dev/null 2>&1 || need+=(libxxhash-dev)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -q </dev/null
    $SUDO apt-get install -y -q "${need[@]}" </dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]' </dev/null
# pyenv only sees new console scripts after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
if ! command -v tremus >/dev/null 2>&1; then
    echo "note: the 'tremus' command is not on PATH here; 'python3 -m tremus' is the same" >&2
fi

#!/usr/bin/env bash
# Install the system packages hypeman-images needs on Debian 12 (bookworm).
#
# e2fsprogs >= 1.47.1 (for `mke2fs -d -` reading a tar stream) comes from
# bookworm-backports. The backports suite is added by reusing the mirror URI
# the machine's apt sources already name, so no package host is written here.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    exec sudo -E "$0" "$@"
fi

export DEBIAN_FRONTEND=noninteractive

backports_list=/etc/apt/sources.list.d/hypeman-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # First "URIs:" line of a deb822 file, or the URI of the first "deb" line.
    mirror=$(grep -hs -m1 '^URIs:' /etc/apt/sources.list.d/debian.sources | awk '{print $2}' || true)
    if [ -z "${mirror}" ]; then
        mirror=$(grep -hs -E '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
            | grep -v security | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' || true)
    fi
    if [ -z "${mirror}" ]; then
        echo "setup-system: cannot find the Debian mirror in the apt sources" >&2
        exit 1
    fi
    cat > "${backports_list}" <<SRC
Types: deb
URIs: ${mirror}
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

apt-get update -qq
apt-get install -y -qq --no-install-recommends -t bookworm-backports \
    e2fsprogs libext2fs2 libcom-err2 libss2 logsave >/dev/null
apt-get install -y -qq --no-install-recommends \
    python3-venv libarchive13 docker-registry umoci skopeo apache2-utils \
    qemu-system-x86 linux-image-cloud-amd64 busybox-static util-linux libc-bin \
    kmod cpio zstd lz4 time mmdebstrap iproute2 erofs-utils >/dev/null
# Say which mke2fs the tests will use, and refuse one too old for `-d -`.
# (No `| head` here: with pipefail, mke2fs dying of SIGPIPE would fail setup.)
version=$(mke2fs -V 2>&1)
echo "${version%%$'\n'*}"
dpkg --compare-versions "$(dpkg-query -W -f='${Version}' e2fsprogs)" ge 1.47.1 || {
    echo "setup-system: e2fsprogs >= 1.47.1 is needed (mke2fs -d - reads a tar stream)" >&2
    exit 1
}

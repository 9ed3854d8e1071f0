#!/usr/bin/env bash
# Builds the Debian base image the Dockerfile starts FROM (debian:bookworm-slim) without any image
# registry: debootstrap a minimal bookworm root filesystem from a Debian package mirror and
# `docker import` it under that tag. Where a registry is reachable this is not needed (docker pulls
# the official image); where it is not (the machines that build and test flotilla), this makes the
# Dockerfile build unchanged.
#
#   docker/build-base.sh            # does nothing when the tag already exists
#   docker/build-base.sh --force    # rebuild it anyway
#
# Environment: BASE_TAG (default debian:bookworm-slim), DEBIAN_SUITE (bookworm), DEBIAN_MIRROR
# (default: the host's first Debian mirror in /etc/apt, else http://deb.debian.org/debian).
# Needs root (debootstrap) and the debootstrap package (`apt-get install debootstrap`).
set -euo pipefail

BASE_TAG=${BASE_TAG:-debian:bookworm-slim}
SUITE=${DEBIAN_SUITE:-bookworm}
force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

command -v docker >/dev/null || { echo "build-base: docker is not installed" >&2; exit 1; }

# One build at a time (make docker and the container tests may both want the image).
lock=${TMPDIR:-/tmp}/flotilla-build-base.lock
exec 9>"$lock"
flock 9

if [[ $force == 0 ]] && docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  echo "build-base: $BASE_TAG already exists"
  exit 0
fi

if [[ $(id -u) != 0 ]]; then
  echo "build-base: debootstrap needs root; run: sudo $0 $*" >&2
  exit 1
fi
command -v debootstrap >/dev/null || { echo "build-base: debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }

mirror=${DEBIAN_MIRROR:-}
if [[ -z $mirror ]]; then
  # deb822 sources (URIs: ...) first, then one-line sources (deb URL suite ...); skip the security archive.
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && $2 !~ /security/ && $2 ~ /debian/ { print $2; exit }')
  [[ -n $mirror ]] || mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*debian/) { print $i; exit } }')
  [[ -n $mirror ]] || mirror=http://deb.debian.org/debian
fi

arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
root=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-rootfs.XXXXXX")
cleanup() {
  # debootstrap may leave /proc or /sys mounted inside the root on failure.
  for m in proc sys dev/pts dev; do umount -l "$root/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT

echo "build-base: debootstrap --variant=minbase $SUITE from $mirror ($arch)"
debootstrap --variant=minbase --arch="$arch" "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -n 40 "$root.log" >&2
  rm -f "$root.log"
  echo "build-base: debootstrap failed" >&2
  exit 1
}
rm -f "$root.log"

# Slim it the way the official -slim images are: no documentation, manuals or locales from later
# installs, no package caches or lists.
mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$root"/usr/share/{man,info,groff,lintian,linda}/* "$root"/usr/share/locale/* \
  "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/log/apt/* \
  "$root"/tmp/* "$root"/root/.bash_history
: >"$root/etc/machine-id"
# The image's apt sources: the mirror it was built from, and security updates.
cat >"$root/etc/apt/sources.list" <<SRC
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SRC

echo "build-base: importing as $BASE_TAG"
tar --numeric-owner --xattrs -C "$root" -c . | docker import \
  --change 'CMD ["bash"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --message "debootstrap --variant=minbase $SUITE $mirror (flotilla docker/build-base.sh)" \
  - "$BASE_TAG" >/dev/null
docker image ls "$BASE_TAG"

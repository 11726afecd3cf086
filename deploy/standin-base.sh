#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm, for building the Dockerfile where no registry
# serves that image (no Docker Hub here): a Debian bookworm root made by debootstrap from the
# machine's own Debian mirror, with Python laid out where the official image has it, imported
# into buildah's local storage under the official name, so that
#   buildah bud --pull=never ...
# builds the Dockerfile unchanged. Needs root, debootstrap and buildah (./dev installs both).
#
#   deploy/standin-base.sh            make (or reuse) the base, print its image id
#
# How it differs from the official image (docs/deploy.md says the same):
# - Python is Debian's python3.11 (3.11.2 with Debian's patches and security updates) in
#   /usr/bin, linked from /usr/local/bin/{python,python3,python3.11,pip,pip3}; the official
#   image compiles the newest 3.11.x from python.org into /usr/local. Debian's
#   EXTERNALLY-MANAGED marker is removed, so `pip install` as root works as it does there.
# - `python -m venv` makes venvs with pip from Debian's python3-pip-whl (pip 23.0.1) where the
#   official image's venvs get the pip of its release.
# - No GPG_KEY / PYTHON_SHA256 variables; PYTHON_VERSION is Debian's version. Documentation,
#   man pages and apt lists are removed, as in the slim image.
#
# Environment: IMGREC_IMAGE_CACHE (default /var/tmp/imgrec-images) holds the root's tarball,
# keyed by a hash of this script, and buildah's storage (no daemon; builds run with chroot
# isolation). The storage driver is overlay where the kernel mounts overlayfs there, else vfs
# (a full copy of the root per step: 3-13x slower here, docs/deploy.md); the choice is kept in
# $CACHE/driver, which deploy/images.py reads. Nothing here is written into the repository.
# IMGREC_DEBIAN_MIRROR overrides the mirror read from /etc/apt.
set -euo pipefail

NAME=docker.io/library/python:3.11-slim-bookworm
CACHE=${IMGREC_IMAGE_CACHE:-/var/tmp/imgrec-images}
HASH=$(sha256sum "$0" | cut -c1-16)
TARBALL=$CACHE/standin-base-$HASH.tar

storage_driver() {
  # overlay if the kernel mounts an overlayfs in the cache's file system (not, e.g., on an
  # overlayfs itself or in a container without CAP_SYS_ADMIN); vfs otherwise
  if [ ! -s "$CACHE/driver" ]; then
    local t driver=vfs
    mkdir -p "$CACHE"
    t=$(mktemp -d "$CACHE/probe.XXXXXX")
    mkdir "$t/l" "$t/u" "$t/w" "$t/m"
    if mount -t overlay overlay -o "lowerdir=$t/l,upperdir=$t/u,workdir=$t/w" "$t/m" 2>/dev/null; then
      umount "$t/m"
      driver=overlay
    fi
    rm -rf "$t"
    echo "$driver" > "$CACHE/driver"
  fi
  cat "$CACHE/driver"
}
bh() {
  buildah --root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver "$DRIVER" "$@"
}

mirror() {
  if [ -n "${IMGREC_DEBIAN_MIRROR:-}" ]; then echo "$IMGREC_DEBIAN_MIRROR"; return; fi
  # the first Debian URI of the machine's apt sources (deb822 or one-line form)
  local uri
  uri=$(grep -hoE '(URIs:[[:space:]]*|^deb[[:space:]]+)(https?://[^[:space:]]+/debian)\b' \
          /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -oE 'https?://[^[:space:]]+' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

make_root() {
  local root=$1 url
  url=$(mirror)
  debootstrap --variant=minbase \
    --include=python3.11,python3.11-venv,python3-pip,ca-certificates,netbase,tzdata \
    bookworm "$root" "$url" >&2
  # the official image's sources, and its security updates applied
  cat > "$root/etc/apt/sources.list" <<EOF
deb $url bookworm main
deb $url bookworm-updates main
deb ${url%/debian}/debian-security bookworm-security main
EOF
  chroot "$root" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get -y -qq upgrade >&2
  chroot "$root" apt-get clean
  # the official layout: python, python3 and pip in /usr/local/bin
  for n in python python3 python3.11; do ln -sf /usr/bin/python3.11 "$root/usr/local/bin/$n"; done
  for n in pip pip3; do ln -sf /usr/bin/pip3 "$root/usr/local/bin/$n"; done
  rm -f "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
         "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log \
         "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
}

make_tarball() {
  mkdir -p "$CACHE"
  local root
  root=$(mktemp -d "$CACHE/root.XXXXXX")
  make_root "$root"
  chroot "$root" python3.11 -c 'import platform; print(platform.python_version())' \
    > "$CACHE/standin-base-$HASH.version"
  tar -C "$root" --numeric-owner -cf "$TARBALL.part" .
  rm -rf "$root"
  mv "$TARBALL.part" "$TARBALL"
  # older tarballs were made by other versions of this script
  find "$CACHE" -maxdepth 1 -name 'standin-base-*' ! -name "standin-base-$HASH.*" -delete
}

import_image() {
  local ctr version
  version=$(cat "$CACHE/standin-base-$HASH.version")
  ctr=$(bh from --pull=never scratch)
  bh add "$ctr" "$TARBALL" / >/dev/null
  bh config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --env "PYTHON_VERSION=$version" --cmd '["python3"]' \
    --label "imgrec.standin=$HASH" \
    --label "org.opencontainers.image.description=imgrec's stand-in for python:3.11-slim-bookworm (deploy/standin-base.sh)" \
    "$ctr"
  bh commit --quiet --rm "$ctr" "$NAME" >/dev/null
}

have_image() {
  [ "$(bh inspect --type image --format '{{index .OCIv1.Config.Labels "imgrec.standin"}}' "$NAME" 2>/dev/null)" = "$HASH" ]
}

[ "$(id -u)" = 0 ] || { echo "standin-base.sh: needs root (debootstrap, chroot)" >&2; exit 1; }
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { echo "standin-base.sh: $tool is missing (./dev setup installs it)" >&2; exit 1; }
done
DRIVER=$(storage_driver)
if ! have_image; then
  [ -f "$TARBALL" ] || make_tarball
  import_image
fi
bh inspect --type image --format '{{.FromImageID}}' "$NAME"
echo

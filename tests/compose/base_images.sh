#!/usr/bin/env bash
# TEST HARNESS ONLY. Users of docker-compose.yml get the official images from Docker Hub.
#
# Makes stand-ins for the three base images docker-compose.yml and docker/*.Dockerfile name
# (python:3.11-slim, redis:7.4, heartexlabs/label-studio:1.23.2) on a machine that reaches the package
# registries (Debian, PyPI) but no container registry. An image that already exists locally (pulled or
# built before) is kept. Each stand-in is Debian bookworm made by debootstrap and `docker import`, with the
# host's certificate authorities, so that pip and apt inside a build trust what the host trusts.
#
#   tests/compose/base_images.sh            # only what `docker image inspect` does not find
#   STANDINS=python tests/compose/base_images.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${STANDIN_WORK:-/var/tmp/roi-standins}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
wanted="${STANDINS:-python redis label-studio}"
root_image="roi-standin/bookworm:minbase"

have() { docker image inspect "$1" >/dev/null 2>&1; }

try_pull() {
  # A registry that answers wins; here none does, and the pull fails in seconds.
  [ -n "${STANDIN_NO_PULL:-}" ] && return 1
  timeout 30 docker pull -q "$1" >/dev/null 2>&1
}

root_fs() {
  have "$root_image" && return
  command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
  rm -rf "$work/rootfs" && mkdir -p "$work"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar -C "$work/rootfs" -c . | docker import - "$root_image" >/dev/null
  rm -rf "$work/rootfs"
}

build() {  # build <tag> <dockerfile>
  local context="$work/context"
  rm -rf "$context" && mkdir -p "$context"
  cp /etc/ssl/certs/ca-certificates.crt "$context/host-ca-certificates.crt"
  docker build -q -t "$1" -f "$here/standins/$2" "$context" >/dev/null
}

standin() {  # standin <tag> <dockerfile>
  if have "$1"; then echo "$1: present"; return; fi
  if try_pull "$1"; then echo "$1: pulled"; return; fi
  root_fs
  local began=$SECONDS
  build "$1" "$2"
  echo "$1: stand-in built in $((SECONDS - began)) s ($(docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1/1e6}'))"
}

for name in $wanted; do
  case "$name" in
    python) standin python:3.11-slim python.Dockerfile ;;
    redis) standin redis:7.4 redis.Dockerfile ;;
    label-studio) standin heartexlabs/label-studio:1.23.2 label-studio.Dockerfile ;;
    *) echo "unknown stand-in $name" >&2; exit 2 ;;
  esac
done

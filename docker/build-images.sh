#!/usr/bin/env bash
# Build the renderfarm images on a machine that reaches no image registry (but does reach
# Debian's archive and PyPI):
#
#   renderfarm/base:bookworm   Debian bookworm, minbase, from debootstrap (python3, python3-venv
#                              and the shared libraries bpy links to), `docker import`ed
#   renderfarm/render:local    Blender for the Docker executor: bpy from wheels in /opt/bpy
#                              (docker/render.Dockerfile), or, with RENDER_BLENDER_TARBALL set,
#                              the official Linux build of Blender (docker/render-blender.Dockerfile)
#   renderfarm/server:local    the API server and scheduler (docker/Dockerfile, target server)
#   renderfarm/agent:local     a node agent (docker/Dockerfile, target agent): renderfarm beside
#                              the render image's Blender, so it runs either executor
#
# Usage (as root, from anywhere):   bash docker/build-images.sh [base|render|server|agent ...]
#
# Python wheels are fetched on the host with pip (its cache is reused; bpy is ~370 MB) into
# $RENDERFARM_IMAGE_CACHE (default ~/.cache/renderfarm-images), and every `docker build` runs
# with --network none. Each image carries a label renderfarm.input-hash, the hash of what it is
# built from (Dockerfile, parent image, source tree, versions); an image whose label matches
# is skipped, so a second run with nothing changed takes seconds. FORCE=1 rebuilds everything.
#
# Environment:
#   PYTHON                  Python 3.11 that runs pip (default: .venv/bin/python, else python3.11)
#   DEBIAN_MIRROR           default http://deb.debian.org/debian
#   BPY_VERSION             default 5.0.1
#   RENDER_BLENDER_TARBALL  path of an official Linux build (blender-X.Y.Z-linux-x64.tar.xz):
#                           the render image runs that `blender` binary instead of bpy
#   RENDERFARM_IMAGE_CACHE  where wheels, build contexts and the rootfs go
#   FORCE=1                 rebuild even when the hash label matches
set -Eeuo pipefail

say() { printf 'build-images: %s\n' "$*"; }
die() {
  printf 'build-images: ERROR: %s\n' "$*" >&2
  exit 1
}
trap 'die "command failed (line $LINENO, status $?): $BASH_COMMAND"' ERR

cd "$(dirname "$0")/.."
REPO=$PWD
CACHE=${RENDERFARM_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/renderfarm-images}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BPY_VERSION=${BPY_VERSION:-5.0.1}
BASE=renderfarm/base:bookworm
RENDER=renderfarm/render:local
SERVER=renderfarm/server:local
AGENT=renderfarm/agent:local
# python3 + venv for bpy and the agent; libGL/EGL and the X11 client libraries bpy's
# __init__.so links to (readelf -d: libGL.so.1 libX11 libXext libXfixes libXi libXrender
# libXt libSM libICE libxkbcommon; no X server runs); xz-utils to unpack a Blender tarball.
PACKAGES=python3,python3-venv,libgl1,libegl1,libx11-6,libxext6,libxfixes3,libxi6,libxkbcommon0,libxrender1,libxxf86vm1,libsm6,libice6,libxt6,xz-utils,ca-certificates

if [ $# -gt 0 ]; then TARGETS=" $* "; else TARGETS=" base render server agent "; fi
for t in $TARGETS; do
  case $t in base | render | server | agent) ;; *) die "unknown image '$t' (base, render, server or agent)" ;; esac
done
wanted() { [[ $TARGETS == *" $1 "* ]]; }

# --- prerequisites ------------------------------------------------------------------------
command -v docker >/dev/null || die "the docker CLI is not installed (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "dockerd does not answer (start it: bash ../shared/services.sh docker)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3.11; fi
fi
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null ||
  die "$PYTHON is not Python 3.11 (the images run Debian bookworm's python3.11); set PYTHON"
if docker buildx version >/dev/null 2>&1; then
  say "builder: BuildKit (docker buildx)"
else
  export DOCKER_BUILDKIT=0 # no buildx plugin here: the legacy builder (it honours --network none)
  say "builder: legacy (no docker buildx; DOCKER_BUILDKIT=0)"
fi
mkdir -p "$CACHE"

label_of() { docker image inspect -f '{{ index .Config.Labels "renderfarm.input-hash" }}' "$1" 2>/dev/null || true; }
image_id() { docker image inspect -f '{{ .Id }}' "$1" 2>/dev/null || die "image $1 is missing; build it first"; }
up_to_date() { # name hash
  if [ "${FORCE:-0}" != 1 ] && [ "$(label_of "$1")" = "$2" ]; then
    say "$1 is up to date (input hash ${2:0:12}), skipped"
    return 0
  fi
  return 1
}
hash_of() { sha256sum | cut -c1-64; }
# Copy a wheel folder into a fresh build context (hard links: no copy on the same disk).
make_context() { # name wheels-dir -> prints the context path
  local ctx=$CACHE/ctx-$1
  rm -rf "$ctx" && mkdir -p "$ctx"
  cp -al "$2" "$ctx/wheels" 2>/dev/null || cp -a "$2" "$ctx/wheels"
  echo "$ctx"
}
# pip options that fetch wheels for the base image's Python (its exact version decides
# markers such as python_full_version < "3.11.3") on x86_64 glibc 2.36 (bookworm)
PIP_TARGET=()
pip_target() {
  [ ${#PIP_TARGET[@]} -gt 0 ] && return 0
  local ver i
  ver=$(docker run --rm --network none "$BASE" python3 -c 'import platform; print(platform.python_version())') ||
    die "cannot run python3 in $BASE"
  PIP_TARGET=(--only-binary=:all: --python-version "$ver" --implementation cp --abi cp311 --abi abi3 --abi none
    --platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
  for i in $(seq 5 36); do PIP_TARGET+=(--platform "manylinux_2_${i}_x86_64"); done
  say "wheels for the image's Python $ver (cp311, manylinux x86_64, glibc 2.36)"
}
build() { # name hash context dockerfile [docker build args...]
  local name=$1 hash=$2 ctx=$3 file=$4 started=$SECONDS
  shift 4
  local logfile=$CACHE/build-${name//[\/:]/-}.log
  say "building $name (docker build --network none -f ${file#"$REPO"/}; output in $logfile) ..."
  if ! docker build --network none --force-rm --label "renderfarm.input-hash=$hash" -f "$file" -t "$name" "$@" "$ctx" \
    >"$logfile" 2>&1; then
    tail -n 40 "$logfile" | sed 's/^/    /' >&2
    die "docker build of $name failed (the end of $logfile is above)"
  fi
  # untagged images of ours (they inherit the base's renderfarm.input-hash label): the
  # legacy builder's intermediate stages, and the image this build replaced
  docker image prune -f --filter label=renderfarm.input-hash >/dev/null || true
  say "$name built in $((SECONDS - started)) s, $(docker image inspect -f '{{ .Size }}' "$name" | numfmt --to=iec) bytes"
}

# --- base: debootstrap minbase, imported ----------------------------------------------------
if wanted base; then
  hash=$(printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" base-v1 | hash_of)
  if ! up_to_date "$BASE" "$hash"; then
    [ "$(id -u)" = 0 ] || die "debootstrap needs root: run this script as root (sudo)"
    if ! command -v debootstrap >/dev/null; then
      say "installing debootstrap (apt-get)"
      (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap) >/dev/null ||
        die "could not install debootstrap with apt-get"
    fi
    root=$CACHE/rootfs
    rm -rf "$root"
    say "debootstrap --variant=minbase $SUITE from $MIRROR (a few minutes) ..."
    started=$SECONDS
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
      die "debootstrap failed; see $CACHE/debootstrap.log: $(tail -n 3 "$CACHE/debootstrap.log")"
    # what an image does not need: package caches and lists, documentation
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
      "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/debootstrap
    say "importing the root filesystem as $BASE"
    tar -C "$root" --numeric-owner -c . | docker import \
      --change "LABEL renderfarm.input-hash=$hash" \
      --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$root"
    say "$BASE made in $((SECONDS - started)) s, $(docker image inspect -f '{{ .Size }}' "$BASE" | numfmt --to=iec) bytes"
  fi
fi

# --- render: Blender (bpy wheels, or an official tarball) -----------------------------------
if wanted render; then
  base_id=$(image_id "$BASE")
  if [ -n "${RENDER_BLENDER_TARBALL:-}" ]; then
    [ -f "$RENDER_BLENDER_TARBALL" ] || die "RENDER_BLENDER_TARBALL=$RENDER_BLENDER_TARBALL is not a file"
    file=$REPO/docker/render-blender.Dockerfile
    hash=$( (cat "$file" && echo "$base_id" && sha256sum <"$RENDER_BLENDER_TARBALL") | hash_of)
    if ! up_to_date "$RENDER" "$hash"; then
      ctx=$CACHE/ctx-render-blender
      rm -rf "$ctx" && mkdir -p "$ctx"
      cp -al "$RENDER_BLENDER_TARBALL" "$ctx/blender.tar.xz" 2>/dev/null || cp "$RENDER_BLENDER_TARBALL" "$ctx/blender.tar.xz"
      version=$(basename "$RENDER_BLENDER_TARBALL" | sed -n 's/^blender-\([0-9][0-9.]*[0-9]\)-.*/\1/p')
      build "$RENDER" "$hash" "$ctx" "$file" --build-arg "BASE_IMAGE=$BASE" --build-arg "BLENDER_VERSION=$version"
    fi
  else
    file=$REPO/docker/render.Dockerfile
    hash=$( (cat "$file" && echo "$base_id bpy==$BPY_VERSION") | hash_of)
    if ! up_to_date "$RENDER" "$hash"; then
      wheels=$CACHE/wheels-render
      rm -rf "$wheels" && mkdir -p "$wheels"
      pip_target
      say "pip download bpy==$BPY_VERSION and its dependencies ..."
      "$PYTHON" -m pip download -q "${PIP_TARGET[@]}" -d "$wheels" "bpy==$BPY_VERSION" ||
        die "pip download of bpy==$BPY_VERSION failed"
      ctx=$(make_context render "$wheels")
      build "$RENDER" "$hash" "$ctx" "$file" --build-arg "BASE_IMAGE=$BASE" --build-arg "BPY_VERSION=$BPY_VERSION"
    fi
  fi
fi

# --- server and agent: renderfarm from wheels ------------------------------------------------
if wanted server || wanted agent; then
  # the source tree the images install (what docker/Dockerfile's wheel is built from)
  src_tar() {
    tar -C "$REPO" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
      --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml README.md protocol server node_agent cli templates
  }
  src_hash=$(src_tar | hash_of)
  file=$REPO/docker/Dockerfile
  base_id=$(image_id "$BASE")
  server_hash=$( (cat "$file" && echo "server $base_id $src_hash") | hash_of)
  agent_hash=""
  if wanted agent; then agent_hash=$( (cat "$file" && echo "agent $base_id $(image_id "$RENDER") $src_hash") | hash_of); fi
  need_server=0 need_agent=0
  if wanted server && ! up_to_date "$SERVER" "$server_hash"; then need_server=1; fi
  if wanted agent && ! up_to_date "$AGENT" "$agent_hash"; then need_agent=1; fi
  if [ $need_server = 1 ] || [ $need_agent = 1 ]; then
    wheels=$CACHE/wheels-app
    rm -rf "$wheels" && mkdir -p "$wheels"
    say "pip wheel renderfarm (pure Python) ..."
    # from a clean copy of the tree: an in-tree build/ could carry files deleted since
    src=$CACHE/src
    rm -rf "$src" && mkdir -p "$src" && src_tar | tar -C "$src" -xf -
    "$PYTHON" -m pip wheel -q --no-deps -w "$wheels" "$src" || die "pip wheel of renderfarm failed"
    rm -rf "$src"
    # Its dependencies are resolved by the base image's own Python: markers such as redis's
    # `python_full_version < "3.11.3"` depend on its exact version, which pip on this host
    # cannot stand in for. The container shares the host's network (to reach PyPI) only for
    # this pip run, with the host's pip cache.
    pip_cache=$("$PYTHON" -m pip cache dir 2>/dev/null || echo "$CACHE/pip")
    mkdir -p "$pip_cache"
    # the host's CA bundle (a TLS-inspecting proxy's CA may be in it) and proxy settings
    ca=${PIP_CERT:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}
    [ -n "$ca" ] && [ -f "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
    run_args=(--rm --network host -v "$wheels:/wheels" -v "$pip_cache:/root/.cache/pip")
    if [ -f "$ca" ]; then run_args+=(-v "$ca:/etc/renderfarm-build-ca.pem:ro" -e PIP_CERT=/etc/renderfarm-build-ca.pem); fi
    for v in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy PIP_INDEX_URL; do
      if [ -n "${!v:-}" ]; then run_args+=(-e "$v"); fi
    done
    say "pip wheel renderfarm's dependencies with $BASE's python3 (its pip cache: $pip_cache) ..."
    docker run "${run_args[@]}" "$BASE" sh -c \
      'python3 -m venv /tmp/venv && /tmp/venv/bin/pip wheel -q --disable-pip-version-check --prefer-binary -w /wheels /wheels/renderfarm-*.whl' ||
      die "pip wheel of renderfarm's dependencies failed (each needs a wheel for $BASE's Python, or pure-Python source)"
    ctx=$(make_context app "$wheels")
    if [ $need_server = 1 ]; then
      build "$SERVER" "$server_hash" "$ctx" "$file" --target server --build-arg "BASE_IMAGE=$BASE"
    fi
    if [ $need_agent = 1 ]; then
      build "$AGENT" "$agent_hash" "$ctx" "$file" --target agent --build-arg "BASE_IMAGE=$BASE" \
        --build-arg "RENDER_IMAGE=$RENDER"
    fi
  fi
fi

say "done:"
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^renderfarm/' | sed 's/^/  /' || true

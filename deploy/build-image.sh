#!/usr/bin/env bash
# Builds the statically linked `sandbox` binary (x86_64-unknown-linux-musl,
# release) and the `sandbox serve` image around it (deploy/Dockerfile), with
# no registry: the image is FROM scratch and the context holds everything.
#
#   deploy/build-image.sh [TAG]        default TAG: sandbox-server:latest
#
# Needs: rustup (adds the musl target when missing), a C compiler for
# wasmtime's one small C file (musl-gcc from Debian's musl-tools when present,
# else the system cc: that file uses no libc function, only a weak symbol),
# and the docker CLI. Honours CARGO_TARGET_DIR, and SANDBOX_BUILD_PROFILE
# (release by default; `dev` compiles in about half the time from cold, for
# quick checks: never ship it).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
tag=${1:-sandbox-server:latest}
profile=${SANDBOX_BUILD_PROFILE:-release}
case $profile in
    release) profile_dir=release ;;
    dev) profile_dir=debug ;;
    *) echo "build-image: SANDBOX_BUILD_PROFILE must be release or dev" >&2; exit 2 ;;
esac
target=x86_64-unknown-linux-musl
triple_env=${target//-/_}

cd "$repo"
if ! rustup target list --installed | grep -qx "$target"; then
    echo "build-image: adding the Rust target $target"
    rustup target add "$target"
fi
if command -v musl-gcc >/dev/null; then
    export "CC_${triple_env}=${CC_x86_64_unknown_linux_musl:-musl-gcc}"
else
    echo "build-image: musl-gcc not found (Debian: apt-get install musl-tools); using cc for wasmtime's helpers.c"
    export "CC_${triple_env}=${CC_x86_64_unknown_linux_musl:-cc}"
fi

echo "build-image: cargo build --profile $profile --target $target --bin sandbox"
build_start=$SECONDS
cargo build --profile "$profile" --target "$target" -p sandbox-host --bin sandbox
echo "build-image: binary built in $((SECONDS - build_start)) s"

bin="${CARGO_TARGET_DIR:-$repo/target}/$target/$profile_dir/sandbox"
if command -v readelf >/dev/null && readelf -l "$bin" | grep -q INTERP; then
    echo "build-image: $bin is dynamically linked; refusing to put it on FROM scratch" >&2
    exit 1
fi

ctx=$(mktemp -d "${TMPDIR:-/tmp}/sandbox-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/etc" "$ctx/rootfs/var/cache/sandbox/components" "$ctx/rootfs/root"
mkdir -m 1777 "$ctx/rootfs/tmp"
cp "$here/passwd" "$here/group" "$ctx/rootfs/etc/"
cp "$here/Dockerfile" "$ctx/Dockerfile"
# Line tables off (symbols stay, so backtraces still name functions).
if command -v strip >/dev/null; then
    strip --strip-debug -o "$ctx/sandbox" "$bin"
else
    cp "$bin" "$ctx/sandbox"
fi
echo "build-image: docker build -t $tag ($(du -h "$ctx/sandbox" | cut -f1) binary)"
docker build --network none -q -t "$tag" "$ctx"

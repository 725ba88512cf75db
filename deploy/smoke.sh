#!/usr/bin/env bash
# End-to-end check of the deployment recipe against the real Docker engine:
#   1. builds the static binary and the server image (deploy/build-image.sh);
#   2. verifies deploy/sandbox.service with systemd-analyze when present;
#   3. runs the server container with the Docker socket and a temporary
#      workspace root mounted at the same path, listening on 0.0.0.0 with a
#      token, and waits for GET /healthz;
#   4. POST /v1/threads/deploy-1/exec writes a file, which must appear on the
#      host under <root>/deploy owned by the sandbox uid (1000 when the
#      server runs as root; SMOKE_EXPECT_UID overrides);
#   5. the reload signal of deploy/sandbox.service's ExecReload (SIGHUP, sent
#      with docker kill --signal HUP) reloads the policy and the server keeps
#      serving: still running, /healthz 200, an exec answers, the log says
#      "SIGHUP: policy reloaded";
#   6. the access log has the exec line; DELETE /v1/users/deploy destroys the
#      user; SIGTERM (docker stop) ends the server with status 0.
# The server container, the user's sandbox, the temporary root and the
# smoke image are removed on exit, pass or fail.
#
# Needs: docker, cargo/rustup, curl or python3, and the sandbox image
# (sandbox-busybox:latest unless SANDBOX_IMAGE says otherwise) on the engine.
# The release build dominates from cold (~10 min on 2 cores, ~1-2 min when
# only this crate changed); SANDBOX_BUILD_PROFILE=dev halves a cold build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
start=$SECONDS
tag=sandbox-server:smoke-$$
name=sandbox-smoke-$$
namespace=smoke-$$
user=deploy
thread=deploy-1
token=smoke-token-$$-$RANDOM
sandbox_image=${SANDBOX_IMAGE:-sandbox-busybox:latest}
expect_uid=${SMOKE_EXPECT_UID:-1000}
root=""
result=FAIL

say() { printf '[smoke %4ss] %s\n' "$((SECONDS - start))" "$*"; }
die() {
    say "error: $*"
    exit 1
}

cleanup() {
    local status=$?
    set +e
    if [ "$result" != PASS ] && docker container inspect "$name" >/dev/null 2>&1; then
        say "server log (last 40 lines):"
        docker logs --tail 40 "$name" 2>&1 | sed 's/^/    /'
    fi
    docker rm -f "$name" >/dev/null 2>&1
    # The user's sandbox, should the DELETE not have run.
    ids=$(docker ps -aq --filter "label=sandbox.namespace=$namespace")
    [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1
    if [ -n "$root" ] && [ -d "$root" ]; then
        # Files belong to the sandbox uid: remove them as root through the
        # engine when this shell cannot.
        rm -rf "$root" 2>/dev/null ||
            { docker run --rm --network none -v "$root:$root" "$sandbox_image" rm -rf "$root/$user" >/dev/null 2>&1
              rm -rf "$root"; }
    fi
    docker rmi "$tag" >/dev/null 2>&1
    if [ "$status" -eq 0 ] && [ "$result" = PASS ]; then
        say "PASS (deploy/smoke.sh, ${SECONDS}s total)"
    else
        say "FAIL (deploy/smoke.sh, ${SECONDS}s total)"
        [ "$status" -eq 0 ] && status=1
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- HTTP: curl, else python3 -------------------------------------------
# http METHOD URL [JSON]: sets $http_status and $http_body (no subshell, so
# call it directly, not in $(...)).
http_status=""
http_body=""
http() {
    local method=$1 url=$2 body=${3:-} out
    out=$(mktemp)
    if command -v curl >/dev/null; then
        local args=(-sS -o "$out" -w '%{http_code}' -X "$method" --max-time 120
            -H "Authorization: Bearer $token")
        [ -n "$body" ] && args+=(-H 'content-type: application/json' --data-binary "$body")
        http_status=$(curl "${args[@]}" "$url" 2>/dev/null) || http_status=000
    else
        http_status=$(python3 - "$method" "$url" "$body" "$token" "$out" <<'PY'
import sys, urllib.request, urllib.error
method, url, body, token, out = sys.argv[1:]
req = urllib.request.Request(url, method=method, data=body.encode() if body else None,
                             headers={"Authorization": "Bearer " + token, "content-type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=120) as r:
        status, data = r.status, r.read()
except urllib.error.HTTPError as e:
    status, data = e.code, e.read()
except Exception:
    status, data = 0, b""
open(out, "wb").write(data)
print(f"{status:03d}")
PY
)
    fi
    http_body=$(cat "$out")
    rm -f "$out"
}

free_port() {
    if command -v python3 >/dev/null; then
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    else
        echo $((20000 + RANDOM % 20000))
    fi
}

# --- 0. prerequisites -----------------------------------------------------
command -v docker >/dev/null || die "the docker CLI is missing"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || die "no Docker engine answers"
command -v curl >/dev/null || command -v python3 >/dev/null || die "need curl or python3"
docker image inspect "$sandbox_image" >/dev/null 2>&1 ||
    die "the sandbox image $sandbox_image is missing: build it first (cargo run -- image build)"

# --- 1. binary and image --------------------------------------------------
say "building the static binary and the image $tag (deploy/build-image.sh)"
build_start=$SECONDS
"$here/build-image.sh" "$tag"
say "binary + image built in $((SECONDS - build_start))s; image size $(docker image inspect -f '{{.Size}}' "$tag") bytes"
profile_dir=release
[ "${SANDBOX_BUILD_PROFILE:-release}" = dev ] && profile_dir=debug
bin="${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-musl/$profile_dir/sandbox"

# --- 2. systemd unit ------------------------------------------------------
if command -v systemd-analyze >/dev/null; then
    unit_dir=$(mktemp -d)
    # verify checks that ExecStart is executable: point it at the fresh binary.
    sed "s|/usr/local/bin/sandbox|$bin|" "$here/sandbox.service" >"$unit_dir/sandbox.service"
    if ! verify=$(systemd-analyze verify "$unit_dir/sandbox.service" 2>&1) || [ -n "$verify" ]; then
        rm -rf "$unit_dir"
        die "systemd-analyze verify deploy/sandbox.service: ${verify:-failed}"
    fi
    rm -rf "$unit_dir"
    say "systemd-analyze verify deploy/sandbox.service: clean"
else
    say "systemd-analyze not found: skipping the unit check (Debian: apt-get install systemd)"
fi

# --- 3. run the server ----------------------------------------------------
root=$(mktemp -d "${TMPDIR:-/tmp}/sandbox-smoke-root.XXXXXX")
port=$(free_port)
url=http://127.0.0.1:$port
say "starting $name on $url (workspace root $root, namespace $namespace)"
docker run -d --name "$name" \
    -v /var/run/docker.sock:/var/run/docker.sock \
    -v "$root:$root" \
    -e SANDBOX_WORKSPACE_ROOT="$root" \
    -e SANDBOX_NAMESPACE="$namespace" \
    -e SANDBOX_IMAGE="$sandbox_image" \
    -e SANDBOX_TOKEN="$token" \
    -p "127.0.0.1:$port:8765" \
    "$tag" >/dev/null
healthy=""
for _ in $(seq 1 120); do
    [ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] ||
        die "the server container exited: $(docker inspect -f '{{.State.ExitCode}}' "$name")"
    http GET "$url/healthz"
    if [ "$http_status" = 200 ]; then
        healthy=yes
        break
    fi
    sleep 0.5
done
[ -n "$healthy" ] || die "GET /healthz never answered 200 (last: $http_status $http_body)"
say "GET /healthz: 200 $http_body"

# --- 4. exec writes a file on the host ----------------------------------
say "POST /v1/threads/$thread/exec"
http POST "$url/v1/threads/$thread/exec" \
    '{"command": "mkdir -p out && echo deployed > out/hello.txt && id -u", "timeout_secs": 60}'
[ "$http_status" = 200 ] || die "exec answered $http_status: $http_body"
case $http_body in
    *'"exit_code":0'*) ;;
    *) die "exec failed: $http_body" ;;
esac
say "exec: $http_body"
file=$root/$user/out/hello.txt
[ -f "$file" ] || die "$file is missing on the host (same-path workspace root?)"
[ "$(cat "$file")" = deployed ] || die "$file holds $(cat "$file")"
owner=$(stat -c %u "$file")
[ "$owner" = "$expect_uid" ] || die "$file is owned by uid $owner, expected $expect_uid"
dir_owner=$(stat -c %u "$root/$user")
[ "$dir_owner" = "$expect_uid" ] || die "$root/$user is owned by uid $dir_owner, expected $expect_uid"
say "host file $file: 'deployed', owner uid $owner"

# --- 5. the reload signal -------------------------------------------------
# What the unit's ExecReload sends; the server (started without --policy,
# the unit's default) must reload the embedded policy and keep serving.
reload_signal=$(sed -n 's/^ExecReload=.*kill -\([A-Z0-9]*\) .*/\1/p' "$here/sandbox.service")
[ "$reload_signal" = HUP ] || die "deploy/sandbox.service's ExecReload sends '${reload_signal:-?}', not HUP"
say "docker kill --signal $reload_signal (the unit's ExecReload)"
docker kill --signal "$reload_signal" "$name" >/dev/null
reloaded=""
for _ in $(seq 1 120); do
    [ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] ||
        die "the server stopped on SIG$reload_signal: exit $(docker inspect -f '{{.State.ExitCode}}' "$name")"
    if docker logs "$name" 2>&1 | grep -qF 'SIGHUP: policy reloaded'; then
        reloaded=yes
        break
    fi
    sleep 0.5
done
[ -n "$reloaded" ] || die "no 'SIGHUP: policy reloaded' in the server's log"
http GET "$url/healthz"
[ "$http_status" = 200 ] || die "GET /healthz after SIG$reload_signal answered $http_status: $http_body"
http POST "$url/v1/threads/$thread/exec" '{"command": "cat out/hello.txt", "timeout_secs": 60}'
[ "$http_status" = 200 ] || die "exec after SIG$reload_signal answered $http_status: $http_body"
case $http_body in
    *'"stdout":"deployed\n"'*) ;;
    *) die "exec after SIG$reload_signal: $http_body" ;;
esac
say "SIG$reload_signal: policy reloaded, /healthz 200, exec: $http_body"

# --- 6. access log, destroy, graceful stop -------------------------------
docker logs "$name" 2>&1 | grep -F '/v1/threads/{thread_id}/exec' | grep -qF "$thread" ||
    die "no access-log line for the exec in the server's log"
say "access log: $(docker logs "$name" 2>&1 | grep -F '/v1/threads/{thread_id}/exec' | tail -1)"
http DELETE "$url/v1/users/$user"
[ "$http_status" = 200 ] || die "DELETE /v1/users/$user answered $http_status: $http_body"
case $http_body in
    *'"destroyed":true'*) ;;
    *) die "DELETE /v1/users/$user: $http_body" ;;
esac
left=$(docker ps -aq --filter "label=sandbox.namespace=$namespace")
[ -z "$left" ] || die "containers left after DELETE: $left"
say "DELETE /v1/users/$user: $http_body"
docker stop -t 30 "$name" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || die "the server exited with $code on SIGTERM"
say "SIGTERM: the server exited with 0"

# --- 7. a workspace root mounted at another path is refused at start -----
# The engine resolves the sandboxes' mounts on the host: with another path
# inside, every sandbox would get an empty directory ("name conflict ... is
# not running" every few seconds, as a user found).
docker rm -f "$name" >/dev/null 2>&1
docker run -d --name "$name" \
    -v /var/run/docker.sock:/var/run/docker.sock \
    -v "$root:/srv/elsewhere" \
    -e SANDBOX_WORKSPACE_ROOT=/srv/elsewhere \
    -e SANDBOX_NAMESPACE="$namespace" \
    -e SANDBOX_IMAGE="$sandbox_image" \
    -e SANDBOX_TOKEN="$token" \
    "$tag" >/dev/null
for _ in $(seq 1 60); do
    [ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] || break
    sleep 0.5
done
code=$(docker inspect -f '{{.State.ExitCode}}' "$name")
refusal=$(docker logs "$name" 2>&1 | tail -1)
[ "$(docker inspect -f '{{.State.Running}}' "$name")" = false ] && [ "$code" != 0 ] ||
    die "a server with its workspace root mounted elsewhere kept running: $refusal"
case $refusal in
    *"mount it at the same path"*"-v $root:$root"*) ;;
    *) die "the refusal does not say which mount to use: $refusal" ;;
esac
say "workspace root mounted at another path: refused (exit $code): $refusal"
result=PASS

#!/usr/bin/env bash
# Runs the README's two commands (`make demo`, `make test`) from a fresh clone inside a
# throwaway Debian 12 root that has only the base system, Python and git: nothing this
# machine has installed over the years can hide a missing install step (issue 11: swaks
# without its TLS modules passed CI here and failed on a new machine).
#
#   scripts/pristine.sh            both commands; the project's build caches are shared
#                                  (~/.cache/smtprelay, the Go caches), system packages are not
#   scripts/pristine.sh --cold     nothing shared: also rebuilds the control plane (~10 min)
#   scripts/pristine.sh -- TARGET  other make targets, e.g. `-- test PYTEST_ARGS=tests/relay`
#
# Go is a precondition of the README (not a Debian package of this version), so the host's
# /usr/local/go is lent read-only. The machine's CA bundle and apt/pip settings are lent too:
# the package proxy here re-signs TLS. Everything mounted is unmounted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CACHE=${SMTPRELAY_CACHE:-$HOME/.cache/smtprelay}
cold=0
targets=(demo test)
while [ $# -gt 0 ]; do
  case "$1" in
    --cold) cold=1 ;;
    --) shift; targets=("$@"); break ;;
    *) echo "usage: $0 [--cold] [-- make-target...]" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "pristine: needs root (chroot, mounts)" >&2; exit 2; }
command -v mmdebstrap >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >&2; }

mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
  || true)
mirror=${mirror:-http://deb.debian.org/debian}
base="$CACHE/pristine/bookworm-minbase.tar"
if [ ! -s "$base" ]; then
  mkdir -p "$(dirname "$base")"
  echo "pristine: making the base root with mmdebstrap (about 75 s)" >&2
  # mmdebstrap picks the output format from the name: keep the .tar suffix on the partial file.
  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates,git \
    bookworm "${base%.tar}.partial.tar" "$mirror" >&2
  mv "${base%.tar}.partial.tar" "$base"
fi

root=$(mktemp -d /tmp/smtprelay-pristine.XXXXXX)
mounts=()
# The root is made a mount point of its own, so that each command can pivot_root into it in
# a private mount namespace instead of chroot: the kernel refuses a chrooted process user
# namespaces (the full-disk tests' unshare) and runc's pivot_root (the real node's pods).
mount --bind "$root" "$root"
mounts+=("$root")
cleanup() {
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT
bind() {  # bind SRC DEST [ro]
  mkdir -p "$root$2"
  mount --rbind "$1" "$root$2"
  mount --make-rslave "$root$2"
  [ "${3:-}" = ro ] && mount -o remount,bind,ro "$root$2"
  mounts+=("$root$2")
}
tar -C "$root" -xf "$base"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/" 2>/dev/null || true
cp /etc/apt/apt.conf.d/99artifact-registry "$root/etc/apt/apt.conf.d/" 2>/dev/null || true
cp /etc/resolv.conf "$root/etc/resolv.conf"
for m in proc sys dev; do bind "/$m" "/$m"; done
mount -t tmpfs tmpfs "$root/tmp"; mounts+=("$root/tmp")
bind /usr/local/go /usr/local/go ro
if [ "$cold" = 0 ]; then
  mkdir -p "$CACHE" "$HOME/go/pkg/mod" "$HOME/.cache/go-build"
  bind "$CACHE" /root/.cache/smtprelay
  bind "$HOME/go/pkg/mod" /root/go/pkg/mod
  bind "$HOME/.cache/go-build" /root/.cache/go-build
fi
git clone -q "$REPO" "$root/work/smtprelay"

echo "pristine: running make ${targets[*]} in $root" >&2
status=0
for target in "${targets[@]}"; do
  start=$SECONDS
  unshare --mount --propagation private --fork /bin/bash -c \
    'cd "$1" && mkdir -p .old-root && pivot_root . .old-root && cd / &&
     umount -l /.old-root && rmdir /.old-root && shift && exec "$@"' _ "$root" \
    /usr/bin/env -i HOME=/root TERM=dumb \
    PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    GOTOOLCHAIN=local GOPROXY="$(go env GOPROXY 2>/dev/null || echo https://proxy.golang.org)" \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    bash -c "cd /work/smtprelay && \
             command -v make >/dev/null || { apt-get update -qq && apt-get install -y -qq make; }; \
             make $target" || status=$?
  echo "pristine: make $target exited $status after $((SECONDS - start)) s" >&2
  [ $status = 0 ] || break
done
exit $status

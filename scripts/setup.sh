#!/usr/bin/env bash
# Installs everything smtprelay's demo and tests need, on a fresh Debian 12 machine, and is a
# quick no-op when it is all there already. Prints the venv's bin directory last.
#
#   system packages  dnsmasq, swaks, Postfix (smtp-sink/smtp-source), make   (apt-get)
#   Python           a venv keyed by pyproject.toml, under ~/.cache/smtprelay  (pip)
#   Kubernetes       etcd, kube-apiserver, controllers, kwok, kubectl built from the
#                    pinned Go modules, under ~/.cache/smtprelay               (go build)
#   the real node    containerd (go install), kubelet and kube-proxy (go build, same pin),
#                    a pause image; runc and CNI plugins from Debian (python -m devcluster build)
#   the relay image  mmdebstrap base + podman build of the Dockerfile, an OCI archive
#                    under ~/.cache/smtprelay/image                  (python -m devcluster image)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${SMTPRELAY_CACHE:-$HOME/.cache/smtprelay}
mkdir -p "$CACHE"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
command -v swaks >/dev/null 2>&1 || missing+=(swaks)
[ -x /usr/sbin/smtp-sink ] || missing+=(postfix)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-venv)
# The image build (devcluster/image.py): Debian's runc, since crun refuses hybrid cgroups.
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
command -v podman >/dev/null 2>&1 || missing+=(podman)
[ -x /usr/sbin/runc ] || missing+=(runc)
# The real node (devcluster/node.py): the CNI bridge plugins, iptables for kube-proxy.
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
command -v iptables-save >/dev/null 2>&1 || [ -x /usr/sbin/iptables-save ] || missing+=(iptables)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} with apt-get" >&2
  as_root apt-get update -qq
  # Postfix is installed for its smtp-sink/smtp-source tools only; no daemon is started.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >&2
fi

key=$( (python3 --version; cat pyproject.toml) | sha256sum | cut -c1-12)
VENV="$CACHE/venv-$key"
if [ ! -x "$VENV/bin/smtprelay" ] || [ ! -f "$VENV/.complete" ]; then
  echo "setup: creating $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q -e '.[test]' >&2
  touch "$VENV/.complete"
else
  # The venv is shared between clones: point the editable install at this one.
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || "$VENV/bin/pip" install -q --no-deps -e . >&2
fi

if [ "${SMTPRELAY_SKIP_CLUSTER_BUILD:-}" != 1 ]; then
  if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    export PATH=/usr/local/go/bin:$PATH
  fi
  "$VENV/bin/python" -m tests.cluster build >/dev/null  # progress and errors go to stderr
fi
echo "$VENV/bin"

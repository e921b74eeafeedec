#!/usr/bin/env bash
# Installs everything smtprelay's demo and tests need, on a fresh Debian 12 machine, and is a
# quick no-op when it is all there already. Prints the venv's bin directory last.
#
#   system packages  see REQUIREMENTS below                                  (apt-get)
#   Python           a venv keyed by pyproject.toml, under ~/.cache/smtprelay  (pip)
#   Kubernetes       etcd, kube-apiserver, controllers, kwok, kubectl built from the
#                    pinned Go modules, under ~/.cache/smtprelay               (go build)
#   the real node    containerd (go install), kubelet and kube-proxy (go build, same pin),
#                    a pause image; runc and CNI plugins from Debian (python -m devcluster build)
#   the relay image  mmdebstrap base + podman build of the Dockerfile, an OCI archive
#                    under ~/.cache/smtprelay/image                  (python -m devcluster image)
#
#   scripts/setup.sh --check   installs nothing: checks every capability the tests use and
#                              prints, for each one missing, the Debian package that gives it;
#                              exit 1 if any is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${SMTPRELAY_CACHE:-$HOME/.cache/smtprelay}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# One row a capability: what the tests need, how to check it, which packages give it.
# A check is about the capability, not the package name: swaks without Net::SSLeay is
# installed but cannot do --tls, and that is what once broke `make test` on a new machine.
has_dnsmasq() { command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ]; }
has_swaks() { command -v swaks >/dev/null 2>&1; }
has_swaks_tls() { has_swaks && swaks --support 2>&1 | grep -q '^=== TLS supported'; }
has_postfix_tools() { [ -x /usr/sbin/smtp-sink ] && [ -x /usr/sbin/smtp-source ]; }
has_make() { command -v make >/dev/null 2>&1; }
has_python_venv() { command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' 2>/dev/null; }
has_unshare() { command -v unshare >/dev/null 2>&1; }
has_mmdebstrap() { command -v mmdebstrap >/dev/null 2>&1; }
has_podman() { command -v podman >/dev/null 2>&1; }
has_runc() { [ -x /usr/sbin/runc ]; }
has_cni() { [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ]; }
has_iptables() { command -v iptables-save >/dev/null 2>&1 || [ -x /usr/sbin/iptables-save ]; }
has_ip() { command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ]; }
REQUIREMENTS=(
  # check                 packages                                       what for
  "has_dnsmasq            dnsmasq-base                                    DNS peer (MX/A records)"
  "has_swaks              swaks                                           SMTP client peer"
  "has_swaks_tls          libnet-ssleay-perl,libio-socket-ssl-perl        swaks --tls (STARTTLS+AUTH tests)"
  "has_postfix_tools      postfix                                         smtp-sink/smtp-source peers, bench"
  "has_make               make                                            the README's two commands"
  "has_python_venv        python3,python3-venv                            the project's virtualenv"
  "has_unshare            util-linux                                      full-disk tests (private tmpfs)"
  "has_mmdebstrap         mmdebstrap                                      the relay image's Debian base"
  "has_podman             podman                                          the relay image (podman build)"
  "has_runc               runc                                            podman and containerd (crun refuses hybrid cgroups)"
  "has_cni                containernetworking-plugins                     the real node's pod network (bridge)"
  "has_iptables           iptables                                        kube-proxy, the node's FORWARD fence"
  "has_ip                 iproute2                                        the real node's bridge and addresses (ip)"
)

missing_packages() {
  local row check pkgs
  for row in "${REQUIREMENTS[@]}"; do
    read -r check pkgs _ <<<"$row"
    "$check" || echo "${pkgs//,/ }"
  done
}

if [ "${1:-}" = --check ]; then
  status=0
  for row in "${REQUIREMENTS[@]}"; do
    read -r check pkgs what <<<"$row"
    if "$check"; then echo "ok       $what"; else
      echo "MISSING  $what: apt-get install ${pkgs//,/ }"; status=1; fi
  done
  if command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ]; then
    echo "ok       Go toolchain (control plane build)"
  else
    echo "MISSING  Go toolchain (control plane build): install Go 1.26 (https://go.dev/dl/)"; status=1
  fi
  exit $status
fi

mkdir -p "$CACHE"
read -r -a missing <<<"$(missing_packages | tr '\n' ' ')"
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} with apt-get" >&2
  as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
  # Postfix is installed for its smtp-sink/smtp-source tools only; no daemon is started.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" >&2
  still=$(missing_packages | tr '\n' ' ')
  if [ -n "${still// /}" ]; then
    echo "setup: installed, yet still missing a capability; packages: $still" >&2
    "$0" --check >&2 || true
    exit 1
  fi
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
  "$VENV/bin/python" -m devcluster build >/dev/null  # progress and errors go to stderr
  "$VENV/bin/python" -m devcluster image >/dev/null
fi
echo "$VENV/bin"

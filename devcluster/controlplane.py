"""Start and stop a loopback control plane: etcd, API server, controllers, scheduler, kwok.

Everything listens on 127.0.0.1 at free ports, writes its log into one run directory, and
is stopped by PID. A start that fails shows the tail of every component's log, because
the component that failed is rarely the one that reports the failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devcluster import kubeconfig, pki

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.0/16"
NODE_NAME = "kwok-node-0"
NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
_STOP_ORDER = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
_START_TIMEOUT = 90.0
_LOG_TAIL = 25


class StartError(RuntimeError):
    """A component did not come up; the message carries every log's tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2
) -> None:
    """Poll until `condition` holds; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclasses.dataclass(frozen=True)
class ControlPlane:
    """A running control plane, as tests and the CLI see it."""

    run_dir: Path
    bin_dir: Path
    server: str
    kubeconfig: Path
    pids: dict[str, int]
    ca_cert: Path
    address: str = "127.0.0.1"

    @property
    def ca(self) -> pki.KeyPair:
        """The cluster CA (certificate and key), for signing a node's client certificate."""
        return pki.KeyPair(cert=self.ca_cert, key=self.ca_cert.with_suffix(".key"))

    def log(self, component: str) -> Path:
        return self.run_dir / "logs" / f"{component}.log"

    def env(self) -> dict[str, str]:
        """Environment for a child (kubectl, the operator) that should talk to this cluster."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        """Run the built kubectl against this cluster; return stdout, raise with stderr."""
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def api_client(self, config_file: Path | None = None) -> ApiClient:
        """A `kubernetes.client.ApiClient` for the admin, or for another kubeconfig."""
        from kubernetes import client, config  # deferred: `up`/`down` never need it

        configuration = client.Configuration()
        # The kubernetes package ships py.typed but leaves this function unannotated.
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(config_file or self.kubeconfig),
            client_configuration=configuration,
        )
        return client.ApiClient(configuration)

    def save_state(self, path: Path) -> None:
        state = dataclasses.asdict(self)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state, default=str, indent=2) + "\n")

    @classmethod
    def load_state(cls, path: Path) -> ControlPlane:
        state = json.loads(path.read_text())
        return cls(
            run_dir=Path(state["run_dir"]),
            bin_dir=Path(state["bin_dir"]),
            server=state["server"],
            kubeconfig=Path(state["kubeconfig"]),
            pids={name: int(pid) for name, pid in state["pids"].items()},
            ca_cert=Path(state["ca_cert"]),
            address=state.get("address", "127.0.0.1"),
        )

    def stop(self, *, keep_run_dir: bool = False) -> None:
        """SIGTERM each component newest-first (etcd last), SIGKILL what lingers."""
        for name in _STOP_ORDER:
            pid = self.pids.get(name)
            if pid is not None:
                terminate(pid, owner_marker=str(self.run_dir))
        if not keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _is_ours(pid: int, owner_marker: str) -> bool:
    """A PID is only signalled while its command line still names our run directory."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
    return not zombie and owner_marker.encode() in cmdline


def terminate(pid: int, *, owner_marker: str, grace: float = 10.0) -> None:
    if not _is_ours(pid, owner_marker):
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not _is_ours(pid, owner_marker), timeout=grace, what=f"pid {pid} to exit")
    except TimeoutError:
        if _is_ours(pid, owner_marker):
            os.kill(pid, signal.SIGKILL)
    # Reap it if it is our child (the fixture's case); `down` runs in another process.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class Launcher:
    """Starts components one by one and remembers them for cleanup and diagnostics."""

    def __init__(self, *, run_dir: Path, bin_dir: Path) -> None:
        self.run_dir = run_dir
        self.bin_dir = bin_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    def start(
        self, name: str, binary: str, args: list[str], env: dict[str, str] | None = None
    ) -> None:
        with (self.run_dir / "logs" / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                [str(self.bin_dir / binary), *args],  # an absolute `binary` stays as it is
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.run_dir,
                env=env,
                # Own session: a terminal's Ctrl-C reaches only the CLI, which then stops
                # the components in order; `up --detach` leaves them running.
                start_new_session=True,
            )

    def await_healthy(self, name: str, probe: Callable[[], bool]) -> None:
        process = self.processes[name]

        def ready() -> bool:
            if process.poll() is not None:
                raise StartError(f"{name} exited with code {process.returncode}")
            return probe()

        wait_for(ready, timeout=_START_TIMEOUT, what=f"{name} to become healthy")

    def diagnostics(self) -> str:
        parts = []
        for name in self.processes:
            lines = (self.run_dir / "logs" / f"{name}.log").read_text(errors="replace")
            tail = "\n".join(lines.splitlines()[-_LOG_TAIL:])
            parts.append(f"----- {name} (last {_LOG_TAIL} lines) -----\n{tail}")
        return "\n".join(parts)

    def kill_all(self, order: tuple[str, ...] = _STOP_ORDER) -> None:
        for name in order:
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _insecure_context() -> ssl.SSLContext:
    """For /healthz of self-signed loopback listeners; never for API calls."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _admin_context(certs: pki.Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca.cert))
    context.load_cert_chain(str(certs.admin.cert), str(certs.admin.key))
    return context


def _api(context: ssl.SSLContext, server: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - https to our own API server
        f"{server}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10, context=context) as response:  # noqa: S310
        return json.loads(response.read())


def fake_node() -> dict[str, Any]:
    """The one kwok-managed node, as kwok's docs describe it; pods schedule onto it."""
    key, value = NODE_ANNOTATION
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", key: value},
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/role": "agent",
                "type": "kwok",
            },
        },
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
        },
    }


def _node_ready(context: ssl.SSLContext, server: str) -> bool:
    try:
        node = _api(context, server, "GET", f"/api/v1/nodes/{NODE_NAME}")
    except (urllib.error.URLError, OSError):
        return False
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _exists(context: ssl.SSLContext, server: str, path: str) -> bool:
    try:
        _api(context, server, "GET", path)
    except (urllib.error.URLError, OSError):
        return False
    return True


def start(
    *,
    bin_dir: Path,
    run_dir: Path | None = None,
    address: str = "127.0.0.1",
    kwok: bool = True,
) -> ControlPlane:
    """Bring the whole control plane up and return once a pod could be scheduled and run.

    `address` is where the API server listens and what it advertises: loopback for the kwok
    tests; an address pods can reach (the real node's) when a kubelet runs pods that talk
    to the API server. `kwok=False` leaves kwok and its fake node out.
    """
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="smtprelay-k8s-"))
    launcher = Launcher(run_dir=run_dir, bin_dir=bin_dir)
    try:
        return _start(launcher, address=address, kwok=kwok)
    except (StartError, TimeoutError, OSError, urllib.error.URLError) as error:
        diagnostics = launcher.diagnostics()
        launcher.kill_all()
        raise StartError(
            f"control plane failed to start: {error}\nrun dir kept: {run_dir}\n{diagnostics}"
        ) from error
    except BaseException:
        launcher.kill_all()
        raise


def _start(launcher: Launcher, *, address: str, kwok: bool) -> ControlPlane:
    run_dir = launcher.run_dir
    certs = pki.generate(run_dir / "pki", service_ip=SERVICE_IP, address=address)
    etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
    kcm_port, scheduler_port, kwok_port = free_port(), free_port(), free_port()
    server = f"https://{address}:{api_port}"
    admin_kubeconfig = kubeconfig.write_client_cert(
        run_dir / "admin.kubeconfig",
        server=server,
        ca_pem=certs.ca.cert_pem(),
        user="admin",
        cert_pem=certs.admin.cert_pem(),
        key_pem=certs.admin.key_pem(),
    )

    etcd_url = f"http://127.0.0.1:{etcd_port}"
    peer_url = f"http://127.0.0.1:{etcd_peer}"
    launcher.start(
        "etcd",
        "etcd",
        [
            f"--data-dir={run_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            # A test cluster's data dies with the session; fsync would only slow it.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
    )
    launcher.await_healthy("etcd", lambda: _http_ok(f"{etcd_url}/health"))

    launcher.start(
        "kube-apiserver",
        "kube-apiserver",
        [
            f"--etcd-servers={etcd_url}",
            f"--bind-address={address}",
            f"--advertise-address={address}",
            f"--secure-port={api_port}",
            f"--cert-dir={run_dir / 'apiserver'}",
            f"--tls-cert-file={certs.apiserver.cert}",
            f"--tls-private-key-file={certs.apiserver.key}",
            f"--client-ca-file={certs.ca.cert}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={certs.service_account_pub}",
            f"--service-account-signing-key-file={certs.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # On top of the defaults (NamespaceLifecycle, ServiceAccount, PodSecurity, ...).
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            # Endpoints may not point at loopback: on loopback nothing in-cluster calls the API.
            f"--endpoint-reconciler-type={'none' if address == '127.0.0.1' else 'lease'}",
            "--profiling=false",
            # What a real cluster has for logs/exec: reach kubelets by the node's InternalIP
            # (no DNS for node names here) and authenticate to them with a client certificate.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={certs.kubelet_client.cert}",
            f"--kubelet-client-key={certs.kubelet_client.key}",
        ],
    )
    admin = _admin_context(certs)
    launcher.await_healthy("kube-apiserver", lambda: _http_ok(f"{server}/readyz", admin))

    common = [
        f"--kubeconfig={admin_kubeconfig}",
        f"--authentication-kubeconfig={admin_kubeconfig}",
        f"--authorization-kubeconfig={admin_kubeconfig}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
    ]
    launcher.start(
        "kube-controller-manager",
        "kube-controller-manager",
        [
            *common,
            f"--secure-port={kcm_port}",
            f"--cert-dir={run_dir / 'kcm'}",
            "--controllers=*",
            # as kubeadm runs it: each controller with its own ServiceAccount, client and
            # rate limit (20 requests/s), not all of them behind one shared limit
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={certs.service_account_key}",
            f"--root-ca-file={certs.ca.cert}",
            f"--cluster-signing-cert-file={certs.ca.cert}",
            f"--cluster-signing-key-file={certs.ca.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ],
    )
    launcher.start(
        "kube-scheduler",
        "kube-scheduler",
        [*common, f"--secure-port={scheduler_port}", f"--cert-dir={run_dir / 'scheduler'}"],
    )
    if kwok:
        key, value = NODE_ANNOTATION
        launcher.start(
            "kwok",
            "kwok",
            [
                f"--kubeconfig={admin_kubeconfig}",
                f"--config={launcher.bin_dir / 'kwok-stages.yaml'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={key}={value}",
                f"--server-address=127.0.0.1:{kwok_port}",
                "--node-ip=127.0.0.1",
                f"--cidr={POD_CIDR}",
            ],
        )
    insecure = _insecure_context()
    launcher.await_healthy(
        "kube-controller-manager",
        lambda: _http_ok(f"https://127.0.0.1:{kcm_port}/healthz", insecure),
    )
    launcher.await_healthy(
        "kube-scheduler",
        lambda: _http_ok(f"https://127.0.0.1:{scheduler_port}/healthz", insecure),
    )
    if kwok:
        launcher.await_healthy("kwok", lambda: _http_ok(f"http://127.0.0.1:{kwok_port}/healthz"))
        _api(admin, server, "POST", "/api/v1/nodes", fake_node())
        launcher.await_healthy("kwok", lambda: _node_ready(admin, server))
    # The ServiceAccount admission plugin refuses pods until the namespace's default
    # account exists, so a test's first pod would race the controller manager.
    launcher.await_healthy(
        "kube-controller-manager",
        lambda: _exists(admin, server, "/api/v1/namespaces/default/serviceaccounts/default"),
    )
    return ControlPlane(
        run_dir=run_dir,
        bin_dir=launcher.bin_dir,
        server=server,
        kubeconfig=admin_kubeconfig,
        pids={name: process.pid for name, process in launcher.processes.items()},
        ca_cert=certs.ca.cert,
        address=address,
    )

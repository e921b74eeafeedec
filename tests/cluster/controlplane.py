"""The control plane moved to `devcluster.controlplane`; this keeps `tests.cluster` imports."""

from devcluster.controlplane import ControlPlane, StartError, free_port, start, wait_for

__all__ = ["ControlPlane", "StartError", "free_port", "start", "wait_for"]

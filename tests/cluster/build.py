"""The build moved to `devcluster.build`; this keeps `tests.cluster` imports working."""

from devcluster.build import BuildError, bin_dir, ensure_built

__all__ = ["BuildError", "bin_dir", "ensure_built"]

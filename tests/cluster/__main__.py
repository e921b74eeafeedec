"""`python -m tests.cluster` is now `python -m devcluster`; kept for muscle memory."""

from devcluster.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())

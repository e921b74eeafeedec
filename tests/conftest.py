"""Shared pytest plugins for every test package."""

pytest_plugins = ["tests.cluster.fixtures"]

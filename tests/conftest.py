"""Shared fixtures: a real nats-server per session, real PostgreSQL clusters per need."""

pytest_plugins = ["tests.fixtures.nats", "tests.fixtures.pg", "tests.fixtures.s3"]

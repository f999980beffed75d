"""Test doubles and server helpers shared by the integration tests."""

"""Example call-control handlers."""

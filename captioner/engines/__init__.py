"""Execution engines beside the local one: Ray Data pipelines for clusters (optional extra)."""

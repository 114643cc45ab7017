"""Shard planning, extraction and verification."""

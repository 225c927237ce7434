"""Decoding: batched KV-cache sampling into sample-set folders."""

"""Attention rank service: runs attention for its batches and reaches routed experts asynchronously."""

"""Benchmark: the sync against a raw binary COPY and a plain REST + dlt baseline, on local parts."""

"""Profiler traces: capture live runs, read Kineto JSON, the normalized op table, overlap metrics."""

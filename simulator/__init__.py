"""Discrete-event simulator of GPU clusters (SimPy engine, networkx topologies)."""

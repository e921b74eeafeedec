"""Benchmarks: the relay and its peer (Postfix) side by side in one run, ratios printed.

Speed and memory are measured here, never asserted in timed tests. Every load loop is bounded
in count and time, everything listens on loopback only, and each run ends the processes it
started, by pid.
"""

"""Benchmarks of the testbed's own parts (``./inv bench``): VM bring-up, the namespace drill, the
Python and C gateways. They time what the other packages do and change nothing of it; nothing in the
testbed imports them (only the cli's bench task does).
"""

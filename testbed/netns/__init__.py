"""The namespace testbed: sites as Linux network namespaces on this host, with netem on their links.

How a drill runs on it (the namespace drill, its gateways and faults) belongs in :mod:`testbed.drill.vm`;
nothing here knows of drills or of the VM testbed.
"""

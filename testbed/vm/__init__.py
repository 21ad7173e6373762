"""The libvirt VM testbed: guests, hypervisor, images, bridges, disks, the testbed's state, and its WAN
shaping (``wan``: netem in the guests or a router VM, which the bed boots and so imports).

What a drill does on a testbed (faults, gateways, judging) belongs in :mod:`testbed.drill.vm`, not here.
"""

"""The drills and what judges them: the VM drill (``vm``) and the namespace drill (``local``) over one
recipe (``runner``), their faults, gateways, wire checks, reports, plots, experiments and campaigns.

Testbeds themselves (:mod:`testbed.vm`, :mod:`testbed.netns`) and flag parsing (:mod:`testbed.cli`)
do not belong here; imports from here point down to the testbeds and the base, never up to the cli.
"""

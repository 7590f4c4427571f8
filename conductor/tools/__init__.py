"""Operator tooling, apart from the conductor service: ``fleetctl`` (``fleetctl/``), the local
process cluster (``cluster*``), the demos (``demo*``: ``python -m conductor.tools.demo``) and the
export of an earlier release's code (``release_tree``). Nothing here runs inside a service
process.
"""

"""The RPC clients of Fleet's services, one module per API, each with its topic, namespace and
version history: the client owns the contract, and the server imports its constants from here.

- ``conductor``: the conductor's object indirection API (agents' ``indirection_api``) and
  ``baseapi`` ping.
- ``compute_task``: the conductor's compute-task API (``fleetctl``; agents handing a build
  back for a reschedule).
- ``compute``: the compute agents' API (conductors; agents calling peers).

They import only the shared contract and the messaging runtime, so an agent can hold a
conductor client without loading the conductor, and the other way round.
"""

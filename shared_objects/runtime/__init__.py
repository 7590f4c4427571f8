"""The service plumbing both Fleet services (and the tools) run on, apart from the contract.

The RPC runtime (``messaging/``: transport, client, server, codec, the RabbitMQ and in-memory
drivers), configuration (``config/``), logging (``log``), metrics and their HTTP endpoint
(``metrics``, ``http``), systemd's sd_notify (``sdnotify``), the service runner and start-up
retries (``service_runner``, ``startup_retry``), TLS and URL secrets (``tls``, ``url_secrets``),
and who is calling (``identity``, ``authorizer``, ``audit``). What services say to each other
is in the contract (``shared_objects``); this package imports from it only its leaf modules
(context, exceptions, releases, version), never the objects (``tests/unit/test_layers.py``).
"""

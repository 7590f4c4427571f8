"""The contract both sides of Fleet import: objects, context, exceptions, releases, the RPC
clients; the service plumbing is in ``shared_objects.runtime``, test support in
``shared_objects.testing``."""

import warnings

# oslo.versionedobjects imports oslo.messaging, which imports oslo.service and with it eventlet;
# Fleet never uses eventlet, so its deprecation banner on every start is noise to operators.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

"""The contract both sides of Fleet import: RPC runtime, objects, context, configuration."""

import warnings

# oslo.versionedobjects imports oslo.messaging, which imports oslo.service and with it eventlet;
# Fleet never uses eventlet, so its deprecation banner on every start is noise to operators.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

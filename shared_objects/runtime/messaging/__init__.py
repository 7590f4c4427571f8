"""Fleet's RPC runtime: asyncio on aio-pika, speaking the oslo.messaging rabbit wire format.

See ``docs/rpc.md`` for the contract. Everything callers need is importable from here.
"""

from shared_objects.runtime.messaging.authorization import Authorizer, ReplyFrom
from shared_objects.runtime.messaging.client import CallContext, RPCClient
from shared_objects.runtime.messaging.dispatcher import expose
from shared_objects.runtime.messaging.exceptions import (
    BrokerConnectFailed,
    ExpectedException,
    InvalidTarget,
    MalformedMessage,
    MessageDeliveryFailure,
    MessageRejected,
    MessageTooDeep,
    MessageTooLarge,
    MessageUndeliverable,
    MessagingError,
    MessagingTimeout,
    NoSuchMethod,
    RemoteError,
    RequestRefused,
    RPCVersionCapError,
    Unauthenticated,
    UncoveredMethods,
    UnsupportedEnvelopeVersion,
    UnsupportedVersion,
)
from shared_objects.runtime.messaging.memory import MemoryBroker
from shared_objects.runtime.messaging.notifier import Notifier
from shared_objects.runtime.messaging.request_scope import release_handler_slot, request_version
from shared_objects.runtime.messaging.serializer import NoOpSerializer, Serializer
from shared_objects.runtime.messaging.server import RPCServer
from shared_objects.runtime.messaging.target import Target
from shared_objects.runtime.messaging.transport import Transport, get_transport
from shared_objects.runtime.messaging.versions import version_is_compatible

__all__ = [
    "Authorizer",
    "BrokerConnectFailed",
    "CallContext",
    "ExpectedException",
    "InvalidTarget",
    "MalformedMessage",
    "MemoryBroker",
    "MessageDeliveryFailure",
    "MessageRejected",
    "MessageTooDeep",
    "MessageTooLarge",
    "MessageUndeliverable",
    "MessagingError",
    "MessagingTimeout",
    "NoOpSerializer",
    "NoSuchMethod",
    "Notifier",
    "RPCClient",
    "RPCServer",
    "RPCVersionCapError",
    "RemoteError",
    "ReplyFrom",
    "RequestRefused",
    "Serializer",
    "Target",
    "Transport",
    "Unauthenticated",
    "UncoveredMethods",
    "UnsupportedEnvelopeVersion",
    "UnsupportedVersion",
    "expose",
    "get_transport",
    "release_handler_slot",
    "request_version",
    "version_is_compatible",
]

"""The transport: one broker connection per process, shared by clients, servers and notifiers."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import structlog

from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging.codec import ALWAYS_ALLOWED_EXMODS
from shared_objects.runtime.messaging.driver import Driver, ReconnectCallback
from shared_objects.runtime.messaging.exceptions import MessagingError
from shared_objects.runtime.messaging.limits import MessageLimits
from shared_objects.runtime.messaging.memory import MemoryBroker, MemoryDriver, broker_for
from shared_objects.runtime.messaging.replies import ReplyWaiter
from shared_objects.runtime.messaging.topology import Topology
from shared_objects.runtime.messaging.urls import ParsedURL, parse_transport_url
from shared_objects.runtime.tls import TLSConfigError, all_loopback, client_context

log = structlog.get_logger(__name__)


class Transport:
    """A connected (or connectable) broker plus the options every peer on it shares.

    Use ``async with transport:`` (or ``connect()``/``close()``). ``pending_replies`` counts the
    calls waiting for a reply across every client of this transport.
    """

    def __init__(
        self,
        config: MessagingConfig,
        driver: Driver,
        *,
        allowed_remote_exmods: Iterable[str] = (),
    ):
        self.config = config
        self.driver = driver
        self.topology = Topology(config)
        self.allowed_remote_exmods = frozenset(allowed_remote_exmods) | ALWAYS_ALLOWED_EXMODS
        #: What every received body must satisfy before it is decoded (``[messaging]``).
        self.limits = MessageLimits(config.max_message_bytes, config.max_message_depth)
        # Named after the login (the driver knows it before connecting: it is in the URL).
        self.replies = ReplyWaiter(
            driver, self.topology.reply_queue(driver.user_id), limits=self.limits
        )
        self._connected = False

    @property
    def control_exchange(self) -> str:
        return self.config.control_exchange

    @property
    def user_id(self) -> str:
        """The broker login: the AMQP ``user_id`` set on everything this transport publishes."""
        return self.driver.user_id

    @property
    def pending_replies(self) -> int:
        """Calls waiting for a reply right now (back to 0 when no call is in flight)."""
        return self.replies.pending

    def on_reconnect(self, callback: ReconnectCallback) -> Callable[[], None]:
        """Call ``callback()`` after every reconnect of this transport's broker link (and after
        a queue it consumes from was deleted under it and declared again); returns a function
        that removes it. Messages sent while the link was down may be lost: this is
        the place to re-read what casts keep in step. ``callback`` must not block (schedule
        work). The memory driver simulates a reconnect with ``MemoryDriver.simulate_reconnect``.
        """
        return self.driver.on_reconnect(callback)

    @property
    def connected(self) -> bool:
        """Connected and the broker link is up right now (False while a lost link is being
        re-established, and before ``connect``/after ``close``)."""
        return self._connected and self.driver.connected

    async def connect(self) -> None:
        if not self._connected:
            await self.driver.connect()
            self._connected = True

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            await self.replies.close()
            await self.driver.close()

    async def __aenter__(self) -> Transport:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def stats(self) -> dict[str, Any]:
        """Driver counters (reconnects, published, ...) plus reply-side counters
        (``forged_replies``: replies and heartbeats refused because they came from a login the
        call did not expect)."""
        return {
            **self.driver.stats(),
            "pending_replies": self.replies.pending,
            "late_replies": self.replies.late_replies,
            "malformed_replies": self.replies.malformed_replies,
            "forged_replies": self.replies.forged_replies,
            "refused_replies": self.replies.refused_replies,
        }


def broker_ssl_context(
    parsed: ParsedURL, config: MessagingConfig, ssl_context: ssl.SSLContext | None = None
) -> ssl.SSLContext | None:
    """The client SSLContext for ``parsed`` (``ssl_context`` if given), after the TLS policy:
    ``no_verify_ssl`` only with ``tls_insecure`` (then a WARNING), and a WARNING whenever a
    broker off this machine is reached without a verified certificate."""
    tls = parsed.tls
    if tls is not None and ssl_context is None:
        if not tls.verify and not config.tls_insecure:
            raise MessagingError(
                "transport URL: no_verify_ssl turns off the broker certificate check; refused "
                "unless [messaging] tls_insecure = true"
            )
        try:
            ssl_context = client_context(
                cafile=tls.cafile,
                capath=tls.capath,
                certfile=tls.certfile,
                keyfile=tls.keyfile,
                verify=tls.verify,
            )
        except TLSConfigError as exc:
            raise MessagingError(f"broker TLS: {exc}") from None
    verified = (
        tls is not None
        and ssl_context is not None
        and ssl_context.verify_mode == ssl.CERT_REQUIRED
        and ssl_context.check_hostname
    )
    if tls is not None and not verified:
        log.warning(
            "broker_tls_unverified",
            hosts=list(parsed.hostnames),
            detail="the broker's certificate is not checked ([messaging] tls_insecure = true): "
            "anyone on the path can impersonate the broker",
        )
    elif tls is None and not all_loopback(parsed.hostnames):
        log.warning(
            "broker_without_tls",
            hosts=list(parsed.hostnames),
            detail="a broker off this machine without TLS: passwords and messages cross the "
            "network in clear; use amqps:// (docs/operations.md, TLS)",
        )
    if tls is not None:
        log.info(
            "broker_tls",
            verified=verified,
            auth=parsed.auth,
            login=parsed.users[0] if parsed.auth == "external" else None,
        )
    return ssl_context


def get_transport(
    messaging_config: MessagingConfig,
    allowed_remote_exmods: Iterable[str] | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    memory_broker: MemoryBroker | None = None,
    connect_timeout: float = 15.0,
    reconnect_interval: float = 1.0,
) -> Transport:
    """A transport for ``messaging_config.transport_url`` (not connected yet).

    ``rabbit://`` / ``amqp://`` / ``amqps://`` give the aio-pika driver (several comma-separated
    hosts fail over; ``amqps://`` or ``?ssl=1`` use TLS, with ``ssl_context`` or one built from
    the URL's ``cafile``/``capath``/``certfile``/``keyfile`` options: the broker's certificate
    and host name are verified; ``?auth=external`` logs in with the client certificate; see
    ``shared_objects.runtime.messaging.urls``). ``memory://[user@]name`` gives the in-process
    driver; transports naming the same broker share it (or pass ``memory_broker``).
    ``allowed_remote_exmods`` lists modules whose exceptions a caller may re-raise as themselves.
    """
    try:
        parsed = parse_transport_url(
            messaging_config.transport_url, heartbeat=messaging_config.heartbeat
        )
    except ValueError as exc:  # the message never carries user-info
        raise MessagingError(str(exc)) from None
    driver: Driver
    if parsed.scheme == "memory":
        broker = memory_broker if memory_broker is not None else broker_for(parsed.hosts[0])
        driver = MemoryDriver(broker, user_id=parsed.users[0] or "guest")
    else:
        from shared_objects.runtime.messaging.rabbit import RabbitDriver

        if messaging_config.rabbit_quorum_queue and messaging_config.amqp_auto_delete:
            raise MessagingError("rabbit_quorum_queue cannot be combined with amqp_auto_delete")
        ssl_context = broker_ssl_context(parsed, messaging_config, ssl_context)
        driver = RabbitDriver(
            parsed,
            publisher_confirms=messaging_config.publisher_confirms,
            ssl_context=ssl_context,
            connect_timeout=connect_timeout,
            reconnect_interval=reconnect_interval,
            publish_timeout=messaging_config.rpc_response_timeout,
        )
    return Transport(messaging_config, driver, allowed_remote_exmods=allowed_remote_exmods or ())

"""Service: one running Fleet service (host + binary), its version and its heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

import structlog

from shared_objects import exception, fields
from shared_objects.base import (
    AtLeast,
    FleetObject,
    FleetObjectRegistry,
    FleetPersistentObject,
    Increment,
    ObjectListBase,
    get_db,
    remotable,
)
from shared_objects.objects._common import (
    from_row,
    insert_row,
    list_from_rows,
    save_changes,
    soft_delete,
    utcnow,
)
from shared_objects.runtime.messaging.exceptions import MessagingError

TABLE = "services"

log = structlog.get_logger(__name__)

DEFAULT_SERVICE_DOWN_TIME = 60.0


@FleetObjectRegistry.register
class Service(FleetPersistentObject, FleetObject):
    """A service row: registered at start, kept fresh by ``heartbeat()``."""

    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    id: int
    host: str
    binary: str
    topic: str | None
    version: int
    disabled: bool
    disabled_reason: str | None
    last_seen_up: datetime.datetime | None
    forced_down: bool
    report_count: int

    # Seconds without a heartbeat after which a service counts as down (``is_up``).
    service_down_time: ClassVar[float] = DEFAULT_SERVICE_DOWN_TIME

    fields = {
        "id": fields.IntegerField(),
        "host": fields.StringField(),
        "binary": fields.StringField(),
        "topic": fields.StringField(nullable=True),
        "version": fields.IntegerField(default=0),
        "disabled": fields.BooleanField(default=False),
        "disabled_reason": fields.StringField(nullable=True),
        "last_seen_up": fields.DateTimeField(nullable=True),
        "forced_down": fields.BooleanField(default=False),
        "report_count": fields.IntegerField(default=0),
    }

    @staticmethod
    def _from_db_object(context: Any, service: Service, row: Mapping[str, Any]) -> Service:
        return from_row(context, service, row)

    def is_up_at(self, now: datetime.datetime, service_down_time: float | None = None) -> bool:
        """Whether the last heartbeat is recent enough at ``now`` (and not forced down)."""
        if self.forced_down or self.last_seen_up is None:
            return False
        limit = self.service_down_time if service_down_time is None else service_down_time
        return (now - self.last_seen_up).total_seconds() <= limit

    @property
    def is_up(self) -> bool:
        """Heartbeat within ``service_down_time`` (default 60 s) and not forced down."""
        return self.is_up_at(utcnow())

    @classmethod
    @remotable
    async def get_by_id(cls, context: Any, service_id: int) -> Service:
        row = await get_db(context, "Service", "get_by_id").get(
            TABLE, {"id": service_id, "deleted": False}
        )
        if row is None:
            raise exception.ServiceNotFound(service_id=service_id)
        return cls._from_db_object(context, cls(), row)

    @classmethod
    @remotable
    async def get_by_host_and_binary(cls, context: Any, host: str, binary: str) -> Service:
        row = await get_db(context, "Service", "get_by_host_and_binary").get(
            TABLE, {"host": host, "binary": binary, "deleted": False}
        )
        if row is None:
            raise exception.ServiceNotFound(service_id=f"{binary}@{host}")
        return cls._from_db_object(context, cls(), row)

    @classmethod
    @remotable
    async def register(
        cls, context: Any, host: str, binary: str, topic: str | None, version: int
    ) -> Service:
        """Create or refresh the row of ``binary`` on ``host`` at start-up (idempotent)."""
        db = get_db(context, "Service", "register")
        now = utcnow()
        values = {"topic": topic, "version": version, "last_seen_up": now}
        rows = await db.update(
            TABLE,
            {"host": host, "binary": binary, "deleted": False},
            {**values, "updated_at": now},
            returning=None,
        )
        if rows:
            return cls._from_db_object(context, cls(), rows[0])
        row = await db.insert(
            TABLE,
            {
                **values,
                "host": host,
                "binary": binary,
                "disabled": False,
                "forced_down": False,
                "report_count": 0,
                "deleted": False,
                "created_at": now,
            },
        )
        return cls._from_db_object(context, cls(), row)

    @classmethod
    @remotable
    async def get_minimum_version(
        cls, context: Any, binary: str, service_down_time: float | None = None
    ) -> int:
        """Lowest version among live (heartbeat within the down time, not forced down)
        services of ``binary``; 0 when none is live."""
        down = cls.service_down_time if service_down_time is None else service_down_time
        cutoff = utcnow() - datetime.timedelta(seconds=down)
        value = await get_db(context, "Service", "get_minimum_version").min_value(
            TABLE,
            "version",
            {
                "binary": binary,
                "deleted": False,
                "forced_down": False,
                "last_seen_up": AtLeast(cutoff),
            },
        )
        return int(value or 0)

    @remotable
    async def create(self) -> None:
        if self.obj_attr_is_set("id"):
            raise exception.ObjectAlreadyCreated(objname="Service")
        db = get_db(self._context, "Service", "create")
        if await db.get(TABLE, {"host": self.host, "binary": self.binary, "deleted": False}):
            raise exception.ObjectAlreadyExists(objname="Service", key=f"{self.binary}@{self.host}")
        await insert_row(self, TABLE, defaults="all")

    @remotable(send_changes_only=True)
    async def save(self) -> None:
        await save_changes(self, TABLE, lambda: exception.ServiceNotFound(service_id=self.id))

    @remotable(send_changes_only=True)
    async def heartbeat(self) -> None:
        """Record that the service is alive now (conductor's clock), counting reports."""
        rows = await get_db(self._context, "Service", "heartbeat").update(
            TABLE,
            {"id": self.id},
            {"last_seen_up": utcnow(), "report_count": Increment()},
            returning=["last_seen_up", "report_count"],
            standalone=True,
        )
        if not rows:
            raise exception.ServiceNotFound(service_id=self.id)
        self.last_seen_up = rows[0]["last_seen_up"]
        self.report_count = rows[0]["report_count"]
        self.obj_reset_changes()

    @remotable(send_changes_only=True)
    async def destroy(self) -> None:
        await soft_delete(self, TABLE, lambda: exception.ServiceNotFound(service_id=self.id))


@FleetObjectRegistry.register
class ServiceList(ObjectListBase[Service], FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    objects: Any

    fields = {
        "objects": fields.ListOfObjectsField("Service"),
    }

    @classmethod
    @remotable
    async def get_by_binary(
        cls, context: Any, binary: str, include_disabled: bool = False
    ) -> ServiceList:
        where: dict[str, Any] = {"binary": binary, "deleted": False}
        if not include_disabled:
            where["disabled"] = False
        rows = await get_db(context, "ServiceList", "get_by_binary").select(TABLE, where)
        return list_from_rows(cls, context, rows, Service)

    @classmethod
    @remotable
    async def get_all(cls, context: Any) -> ServiceList:
        rows = await get_db(context, "ServiceList", "get_all").select(TABLE, {"deleted": False})
        return list_from_rows(cls, context, rows, Service)


ContextFactory = Callable[[], AbstractAsyncContextManager[Any]]
# One beat: given the report's context and the registered row, mark the service alive.
Beat = Callable[[Any, Service], Awaitable[None]]


async def heartbeat_beat(ctxt: Any, service: Service) -> None:
    """The beat of release 1.1 and of conductors: ``Service.heartbeat()``."""
    service._context = ctxt
    await service.heartbeat()


class ServiceReporter:
    """Registers a service row at start and beats every ``interval`` seconds.

    ``context_factory`` yields the context each report runs in: on an agent a plain context
    (the beat travels to the conductor), in the conductor one with a database unit of work.
    ``beat`` marks the service alive: ``Service.heartbeat()`` by default; agents use the
    cheaper ``report_alive`` where conductors have it (``compute_agent/liveness.py``).
    A failed report is logged and retried at the next interval: liveness must survive a
    conductor or broker hiccup.

    Beats are spread out: the first comes after a random part of the interval, and each wait
    is between 90 and 100 % of it, so a thousand agents started together do not beat in
    lock-step (and, counted from one beat's start to the next, never beat less often than
    ``interval``).
    """

    def __init__(
        self,
        context_factory: ContextFactory,
        *,
        host: str,
        binary: str,
        topic: str | None,
        version: int,
        interval: float = 10.0,
        beat: Beat = heartbeat_beat,
        rng: random.Random | None = None,
    ) -> None:
        self._context_factory = context_factory
        self._beat = beat
        self._rng = rng if rng is not None else random.Random()
        self.host = host
        self.binary = binary
        self.topic = topic
        self.version = version
        self.interval = interval
        self.service: Service | None = None
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        # A beat on its way (stop lets it land: see stop()).
        self._beating = False
        self._stopping = False

    async def start(self) -> Service:
        """Register (or refresh) the row, then start the heartbeat task."""
        async with self._context_factory() as ctxt:
            self.service = await Service.register(
                ctxt, self.host, self.binary, self.topic, self.version
            )
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self.binary}")
        return self.service

    async def report(self) -> None:
        """One heartbeat now."""
        assert self.service is not None, "start() first"
        async with self._context_factory() as ctxt:
            await self._beat(ctxt, self.service)

    def next_wait(self, *, first: bool = False) -> float:
        """Seconds until the next beat (see the class docstring)."""
        low = 0.0 if first else 0.9
        return self.interval * self._rng.uniform(low, 1.0)

    async def _run(self) -> None:
        # Registering just marked the row up: the first beat may come anywhere in the interval.
        loop = asyncio.get_running_loop()
        wait = self.next_wait(first=True)
        while True:
            await asyncio.sleep(wait)
            started = loop.time()
            self._beating = True
            try:
                await self.report()
            except asyncio.CancelledError:
                raise
            except (exception.FleetException, MessagingError) as exc:
                # An outage (database, broker, conductor): one line per missed beat.
                self.failures += 1
                log.warning(
                    "service_heartbeat_failed",
                    binary=self.binary,
                    error=f"{type(exc).__name__}: {str(exc)[:200]}",
                )
            except Exception:
                self.failures += 1
                log.warning("service_heartbeat_failed", binary=self.binary, exc_info=True)
            finally:
                self._beating = False
            if self._stopping:
                return
            # Counted from the start of this beat: a reply that waits for its batch (or a slow
            # conductor) must not stretch the period beyond the interval.
            wait = max(0.0, self.next_wait() - (loop.time() - started))

    async def stop(self, *, beat_grace: float = 5.0) -> None:
        """Stop beating. A beat already on its way is given ``beat_grace`` seconds to land
        first: cut off, the conductor may still write it after the caller marked the service
        down (``report_alive`` waits for its batch), and the service would look up again."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        if self._beating:
            await asyncio.wait({task}, timeout=beat_grace)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._task = None

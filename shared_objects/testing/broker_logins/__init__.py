"""RabbitMQ logins for a Fleet cluster: one per agent host, conductor logins, operator logins.

Fleet decides what a caller may do from the AMQP ``user_id`` RabbitMQ validated against the
connection's login (``shared_objects/runtime/identity.py``), so every process logs in as its own
broker user. This is the one place the test kit, ``make demo`` and the local clusters create them::

    logins = BrokerLogins("rabbit://guest:guest@127.0.0.1:5672/fleet-test-x", tag="a1b2c3")
    await logins.ensure(
        conductors=["1", "2"], operators=[""], hosts=["compute-1"], exchanges=["fleet"]
    )
    url = logins.url_for(logins.host_login("compute-1"))   # FLEET_TRANSPORT_URL of that agent
    ...
    await logins.delete()                                   # every user this object created

Fast, in batches: everything one ``ensure`` call needs (users with a ``password_hash`` computed
here, their permissions and topic permissions) goes to the broker in ONE
``rabbitmqctl import_definitions`` run, and only what changed since the last call; ``delete``
removes every user in one ``rabbitmqctl eval`` (one ``delete_user`` per user if that fails).
A batch costs one rabbitmqctl start-up, about 0.7-1 s on the development machine whatever its
size (50 users: 0.8 s), where one ``add_user`` + ``set_permissions`` + ``set_topic_permissions``
per login costs 2-3 s per login. ``last_batch_seconds`` and ``batches`` record what it took.

Users are global to a broker, vhosts are not: two test sessions on one broker would fight over
``fleet-host-compute-1``'s password and delete each other's users. A ``tag`` makes every login
this object names unique (``fleet-host-<tag>-compute-1``, ``fleet-conductor-<tag>-1``,
``fleet-operator-<tag>``); the conductor and operator names still match the default
``[security]`` patterns, and :meth:`BrokerLogins.security_env` gives the
``FLEET_SECURITY__HOST_LOGIN_PREFIX`` the processes need to read the agent logins back. Without a
tag (``make demo``) the logins are the documented ones, ``fleet-host-<host>``.

Permissions (regular ones on the vhost, topic ones on each control exchange and on the reply
exchange ``R`` = ``fleet_reply``), by role. ``E`` is the control exchange(s) —
``exchange_pattern`` and the names given to ``ensure(exchanges=...)`` —, ``T`` the conductor
topic, ``N`` the notification queues ``<topic>.<priority>`` of ``notification_topics`` (the
agents' notifier declares and binds them), ``L`` the login, ``X`` the agent's host, ``C`` the
logins an agent answers (conductors by the ``[security]`` globs, agents by the host prefix, a
legacy shared login); every regex is anchored (RabbitMQ's are not by default):

=========  ===============================================  ====================================
role       configure / write / read                          topic permissions on ``E`` / ``R``
=========  ===============================================  ====================================
conductor  ``.*`` / ``.*`` / ``.*``                           none (every routing key)
agent      c: ``^(E|R|compute_fanout|Q|N)$``                  E write ``^(T|compute\\..+|N)$``
           w: ``^(E|R|Q|N)$``                                 E read ``^(compute\\.X|N)$``
           r: ``^(E|R|compute_fanout|Q)$``                    R write ``^reply_C_[0-9a-f]{32}$``
           where Q = ``compute\\.X|reply_L_[0-9a-f]{32}|``   R read ``^reply_L_[0-9a-f]{32}$``
           ``compute_fanout_X_[0-9a-f]{32}``
operator   c: ``^(E|R|reply_L_[0-9a-f]{32})$``                 E write ``^T$``, read ``^$``
           w: ``^(E|reply_L_[0-9a-f]{32})$``                   R write ``^$``
           r: ``^(R|reply_L_[0-9a-f]{32})$``                   R read ``^reply_L_[0-9a-f]{32}$``
=========  ===============================================  ====================================

Why each right: an RPC client declares ``E`` before publishing (configure) and publishes to it
(write); a server declares and binds its queues (configure and write on the queue, read on the
exchange, topic read on the binding key) and consumes them (read); a caller declares ``R`` and
binds its reply queue there under the queue's own name (topic read: its own name only); a
server publishes its replies on ``R`` (write; topic write: the reply queues of the logins that
may call it); a server's fanout queue is deleted at stop (configure). An agent may therefore
consume only its own ``compute.X``, fanout and reply queues, bind only ``compute.X``, its reply
queue (and the notification queues), and publish on ``E`` only to the conductor, to another
agent's ``compute.<host>`` and notifications, on ``R`` only to conductors' and agents' reply
queues; it cannot consume ``conductor`` nor another login's replies, nor publish through the
default exchange (``amq.default``, which reaches ANY queue by name and has no per-routing-key
check): agents get write on it only while a login of an older release (``old_runtime_hosts``,
``legacy``, ``legacy_queue_names``) is present, whose ``reply_<32 hex>`` queues only the
default exchange reaches. Topic permissions exist per exchange name only, so an exchange known
only by ``exchange_pattern`` has none (every routing key) until it is passed to ``ensure``.

``fleetctl broker setup`` builds on this class: :meth:`BrokerLogins.policies` (``permissions.py``),
:meth:`BrokerLogins.user_limits` and :func:`plan_setup` (the differences between these
definitions and the broker's ``export_definitions``).

Agents on a release before issue 11 (``old_runtime_hosts``, shared ``legacy`` logins) name their
queues differently: the bare ``compute`` queue (bound with key ``compute``), ``reply_<32 hex>``
and ``compute_fanout_<32 hex>``; they get those names too. Two switches follow the code of this
tree while issue 11 lands, each asked of the code itself when left at None:
``legacy_queue_names`` (the RPC runtime still names reply queues ``reply_<32 hex>``: every agent
and operator login gets the old names) and ``agent_topic_queue`` (this tree's agent still
consumes the shared ``compute`` queue: agents may declare, bind and consume it).

The package: ``rules.py`` (permission values, regex pieces, password hash), ``permissions.py``
(what each role may do), ``limits.py`` (policies and per-user limits), ``ctl.py`` (rabbitmqctl),
``logins.py`` (``BrokerLogins``), ``setup.py`` (``fleetctl broker setup``'s plan).
"""

from __future__ import annotations

from shared_objects.testing.broker_logins.ctl import Ctl, CtlError, NodeCtl, Rabbitmqctl, SetupCtl
from shared_objects.testing.broker_logins.limits import BrokerLimits
from shared_objects.testing.broker_logins.logins import BrokerLogins
from shared_objects.testing.broker_logins.rules import (
    AMQP_DEFAULT_EXCHANGE,
    REPLY_EXCHANGE_NAME,
    Permissions,
    TopicPermissions,
    agents_consume_topic_queue,
    hash_password,
    password_matches,
    runtime_names_queues_by_login,
)
from shared_objects.testing.broker_logins.setup import SetupPlan, plan_setup

__all__ = [
    "AMQP_DEFAULT_EXCHANGE",
    "REPLY_EXCHANGE_NAME",
    "BrokerLimits",
    "BrokerLogins",
    "Ctl",
    "CtlError",
    "NodeCtl",
    "Permissions",
    "Rabbitmqctl",
    "SetupCtl",
    "SetupPlan",
    "TopicPermissions",
    "agents_consume_topic_queue",
    "hash_password",
    "password_matches",
    "plan_setup",
    "runtime_names_queues_by_login",
]

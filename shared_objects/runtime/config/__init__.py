"""Fleet configuration: defaults, overridden by a TOML file, overridden by ``FLEET_*`` variables.

Precedence, lowest to highest:

1. the defaults declared on the section dataclasses (``sections.py``);
2. the TOML file named by ``--config PATH`` (or ``FLEET_CONFIG``), one table per section;
3. environment variables: the generic form ``FLEET_<SECTION>__<KEY>`` (for example
   ``FLEET_MESSAGING__HEARTBEAT=10``; ``FLEET_HOST`` for the top-level ``host``) and the short
   aliases in ``ENV_ALIASES`` (``FLEET_TRANSPORT_URL``, ``FLEET_DATABASE_URL``, ...).

Every setting of both services is an option of a section: no module reads the environment on
its own. Variables that releases before 1.2 read directly (``RETIRED_ENV_PREFIXES``) are
refused with the name of their replacement rather than silently ignored.

Everything is validated once, at start (``loader.py``, with the checks of ``_checks.py``): an
unknown key, a bad URL or a bad number raises ``ConfigError`` whose message is one line naming
the key. ``load_config_or_exit`` turns that into a message on stderr and exit status 2, the way
daemons report a broken config file.
"""

from shared_objects.runtime.config.loader import (
    CONFIG_FILE_ENV,
    ENV_ALIASES,
    RETIRED_ENV_PREFIXES,
    ConfigError,
    add_config_arguments,
    config_from_args,
    format_config,
    load_config,
    load_config_or_exit,
    option_names,
)
from shared_objects.runtime.config.sections import (
    ComputeConfig,
    ConductorConfig,
    DatabaseConfig,
    FleetConfig,
    LiveMigrationConfig,
    LoggingConfig,
    MessagingConfig,
    NotificationsConfig,
    SecurityConfig,
    ServiceConfig,
    UpgradeLevelsConfig,
)
from shared_objects.runtime.url_secrets import mask_url

__all__ = [
    "CONFIG_FILE_ENV",
    "ENV_ALIASES",
    "RETIRED_ENV_PREFIXES",
    "ComputeConfig",
    "ConductorConfig",
    "ConfigError",
    "DatabaseConfig",
    "FleetConfig",
    "LiveMigrationConfig",
    "LoggingConfig",
    "MessagingConfig",
    "NotificationsConfig",
    "SecurityConfig",
    "ServiceConfig",
    "UpgradeLevelsConfig",
    "add_config_arguments",
    "config_from_args",
    "format_config",
    "load_config",
    "load_config_or_exit",
    "mask_url",
    "option_names",
]

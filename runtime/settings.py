"""The one settings class, read from the environment; its errors name the variable, never a value."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from assets.errors import ConfigError, CredentialError

#: A Postgres identifier we are willing to quote and use: letters, digits, underscore.
PG_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
#: BigQuery dataset and table names: letters, digits, underscore.
BQ_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,1023}$")
#: BigQuery project ids: lower case letters, digits and hyphens.
BQ_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")

#: How to write a password that libpq's URL parser misreads (the URL itself is never shown).
_ENCODE_HINT = ("percent-encode special characters in the user and password (space %20, / %2F, @ %40, "
                ": %3A, ? %3F, # %23); the value is not shown")

_DEFAULT_STATE_DIR = Path.home() / ".local" / "share" / "gong-sync"


class Settings(BaseSettings):
    """Everything the pipeline reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    database_url: SecretStr | None = Field(default=None, description="Postgres URL (DATABASE_URL)")
    google_application_credentials: Path | None = None
    bigquery_project: str = "prefect-data-warehouse"
    gong_dataset: str = "gongio_ft"
    salesforce_dataset: str = "salesforce"
    #: The email tables are not in every account's Gong ERD: their names are settings.
    email_table: str = "email"
    email_sender_table: str = "email_sender"
    email_recipient_table: str = "email_recipient"
    bigquery_location: str | None = None
    #: Seconds one BigQuery metadata call may take, retries included, and one Storage read stream.
    bigquery_timeout: float = Field(default=120.0, gt=0)
    bigquery_read_timeout: float = Field(default=3600.0, gt=0)
    #: REST endpoint of a BigQuery emulator (`http://host:port`); anonymous credentials when set.
    bigquery_emulator_host: str | None = None
    #: gRPC `host:port` of the emulator's Storage Read API.
    bigquery_storage_emulator_host: str | None = None
    #: The application's schema: the contract tables the pipeline fills (APP_SCHEMA.md).
    destination_schema: str = "public"
    #: Gong-shaped replicas of the source tables, and dlt's own state.
    raw_schema: str = "gong_raw"
    #: The pipeline's bookkeeping: watermarks, id maps, dead letters, schema changes, run records.
    sync_schema: str = "gong_sync"
    #: A build that would delete more than this share of an app table holding at least
    #: MASS_DELETE_MIN_ROWS rows deletes nothing and fails (`--allow-mass-delete` lets one run).
    mass_delete_max_share: float = Field(default=0.05, ge=0, le=1)
    mass_delete_min_rows: int = Field(default=100, ge=0)
    #: Seconds one statement of the pipeline's own connections may run, and may wait for a lock
    #: (an application holding a table lock makes the asset fail, naming who holds it).
    statement_timeout: float = Field(default=3600.0, gt=0)
    lock_timeout: float = Field(default=60.0, gt=0)
    #: Alert when runs have been skipped on a held run lock and no sync succeeded for this long (s).
    stale_after: float = Field(default=3 * 3600.0, gt=0)
    #: A cursor value later than now plus this many seconds never becomes the checkpoint: its
    #: row goes to dead letters, and an alert says so.
    future_cursor_tolerance: float = Field(default=3600.0, ge=0)
    #: Each incremental read also covers this many seconds below the checkpoint: a row Fivetran
    #: committed late with an earlier `_fivetran_synced` is still read. Rows already landed with
    #: that cursor (or a later one) are dropped, so nothing is written twice. 0 turns it off.
    late_row_window: float = Field(default=900.0, ge=0)
    batch_size: int = Field(default=1000, ge=1)
    max_parallel: int = Field(default=4, ge=1, le=64)
    #: Tries after the first for transient failures, and the exponential backoff's base and cap (s).
    retries: int = Field(default=3, ge=0, le=10)
    retry_backoff_base: float = Field(default=1.0, ge=0)
    retry_backoff_max: float = Field(default=30.0, ge=0)
    #: Alerts, each sent when configured: a Slack incoming webhook, a PagerDuty Events v2 routing key.
    slack_webhook_url: SecretStr | None = None
    pagerduty_routing_key: SecretStr | None = None
    pagerduty_events_url: str = "https://events.pagerduty.com/v2/enqueue"
    pagerduty_severity: Literal["critical", "error", "warning", "info"] = "error"
    alert_timeout: float = Field(default=10.0, gt=0)
    internal_email_domains: Annotated[tuple[str, ...], NoDecode] = ("prefect.io",)
    #: Where dlt keeps its working folders (pending load packages); state also lives in Postgres.
    pipelines_dir: Path = _DEFAULT_STATE_DIR / "pipelines"
    #: A Dask scheduler (`tcp://host:8786`): the flow's assets run on its workers, each opening its
    #: own connections, instead of on threads of the flow's process (needs the `dask` extra).
    dask_scheduler_address: str | None = None

    @field_validator("internal_email_domains", mode="before")
    @classmethod
    def _split_domains(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part for part in value.split(",")]
        return tuple(str(part).strip().lower() for part in value if str(part).strip())  # type: ignore[union-attr]

    @field_validator("slack_webhook_url", "pagerduty_routing_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("slack_webhook_url", "pagerduty_events_url")
    @classmethod
    def _http_url(cls, value: object) -> object:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is not None and urlsplit(str(text)).scheme not in ("http", "https"):
            raise ValueError("must be an http(s) URL (the value is not shown)")
        return value

    @field_validator("destination_schema")
    @classmethod
    def _pg_identifier(cls, value: str) -> str:
        if not PG_IDENTIFIER.match(value):
            raise ValueError("must be a plain Postgres identifier (letters, digits, underscore; at most 63)")
        return value

    @field_validator("raw_schema", "sync_schema")
    @classmethod
    def _lower_identifier(cls, value: str) -> str:
        # dlt lands in the snake_case form of a name (GongRaw becomes gong_raw): ask for that form.
        if not PG_IDENTIFIER.match(value) or value != value.lower():
            raise ValueError(
                "must be a lower-case Postgres identifier (letters, digits, underscore; at most 63), "
                "the form it has in Postgres"
            )
        return value

    @field_validator("gong_dataset", "salesforce_dataset", "email_table", "email_sender_table", "email_recipient_table")
    @classmethod
    def _bq_name(cls, value: str) -> str:
        if not BQ_NAME.match(value):
            raise ValueError("must be a BigQuery dataset or table name (letters, digits, underscore)")
        return value

    @field_validator("bigquery_project")
    @classmethod
    def _bq_project(cls, value: str) -> str:
        if not BQ_PROJECT.match(value):
            raise ValueError("must be a BigQuery project id (lower case letters, digits, hyphens)")
        return value

    @model_validator(mode="after")
    def _distinct_schemas(self) -> "Settings":
        names = {"DESTINATION_SCHEMA": self.destination_schema, "RAW_SCHEMA": self.raw_schema,
                 "SYNC_SCHEMA": self.sync_schema}
        if len({v.lower() for v in names.values()}) < len(names):
            raise ValueError(f"{', '.join(names)} must name three different schemas")
        return self

    @property
    def uses_emulator(self) -> bool:
        return bool(self.bigquery_emulator_host)

    def dataset(self, key: str) -> str:
        """The BigQuery dataset behind a source's dataset key (`gong`, `salesforce`)."""
        return {"gong": self.gong_dataset, "salesforce": self.salesforce_dataset}[key]

    def postgres_url(self) -> str:
        """The Postgres URL; a missing one is a credential error naming DATABASE_URL."""
        if self.database_url is None or not self.database_url.get_secret_value().strip():
            raise CredentialError("DATABASE_URL is not set: set it to postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
        url = self.database_url.get_secret_value().strip()
        if urlsplit(url).scheme not in ("postgresql", "postgres"):
            raise CredentialError("DATABASE_URL must start with postgresql:// (the value is not shown)")
        # libpq's own parser, so that what is checked is what connects. Its messages quote the
        # offending part, which may be the password: they are never passed on.
        from psycopg import Error as PsycopgError
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(url)
        except PsycopgError:
            raise CredentialError(
                f"DATABASE_URL cannot be read as postgresql://USER:PASSWORD@HOST:PORT/DATABASE; {_ENCODE_HINT}"
            ) from None
        if "," in str(params.get("host") or "") or "," in str(params.get("port") or ""):
            # libpq would try each in turn; dlt's loader takes one host and one port.
            raise CredentialError("DATABASE_URL names several hosts: name one (the primary the pipeline writes to)")
        port = str(params.get("port") or "5432")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise CredentialError(f"DATABASE_URL: the port is not a number from 1 to 65535; {_ENCODE_HINT}")
        return url


def task_runner_address() -> str | None:
    """DASK_SCHEDULER_ADDRESS, read when the flow is defined (its task runner is chosen then); a
    bad value elsewhere in the settings is the run's to report, not the import's."""
    try:
        address = load_settings().dask_scheduler_address
    except ConfigError:
        return None
    return address.strip() or None if address else None


def load_settings(**overrides: object) -> Settings:
    """Read the settings; a bad value becomes a ConfigError that names the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None

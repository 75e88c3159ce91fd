"""The BigQuery side: clients for the warehouse or the emulator, and single-table Storage reads."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.api_core.retry import Retry, if_transient_error
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import BigQueryReadClient, types

from assets.errors import CredentialError, SourceTableMissing, TransientError
from runtime.settings import BQ_NAME, Settings

#: Storage read streams per table, read one after another: parallel reads measured slower on 2
#: cores (bench/), and several streams still let the server split a large table.
MAX_READ_STREAMS = 4

_TRANSIENT = (
    gexc.ServiceUnavailable,
    gexc.InternalServerError,
    gexc.TooManyRequests,
    gexc.DeadlineExceeded,
    gexc.GatewayTimeout,
    gexc.RetryError,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class BigQueryClients:
    """The REST client (metadata) and the Storage Read client (rows) for one project."""

    project: str
    rest: bigquery.Client
    storage: BigQueryReadClient
    #: Deadline (s) of one metadata call, its own retries included; the library's default is 600 s.
    timeout: float = 120.0
    #: Deadline (s) of one Storage read stream: a hung stream must not hold the run lock for a day.
    read_timeout: float = 3600.0
    #: Where the clients point, for messages: an emulator names its setting.
    endpoint: str = "BigQuery"
    #: Largest share of a read session one stream may carry, or None to read the streams the
    #: server made. BigQuery's ReadRows messages are small whatever the stream; the emulator sends
    #: a stream in messages of up to 65,536 rows (200 MB of 3 KB monologues, which gRPC and the
    #: client hold several times over while decoding), so against it streams are split until each
    #: is this small: a 200k-transcript read peaked at 931 MB unsplit, 187 MB in 4 MB streams.
    stream_bytes: int | None = None

    @property
    def retry(self):  # noqa: ANN201 - google.api_core Retry
        return bigquery.DEFAULT_RETRY.with_deadline(self.timeout)

    def close(self) -> None:
        self.rest.close()
        self.storage.transport.close()


def connect(settings: Settings) -> BigQueryClients:
    """Build both clients; against an emulator with anonymous credentials on its endpoints."""
    project = settings.bigquery_project
    if settings.uses_emulator:
        import grpc
        from google.cloud.bigquery_storage_v1.services.big_query_read.transports import (
            BigQueryReadGrpcTransport,
        )

        if not settings.bigquery_storage_emulator_host:
            raise CredentialError(
                "BIGQUERY_EMULATOR_HOST is set but BIGQUERY_STORAGE_EMULATOR_HOST is not: "
                "set it to the emulator's gRPC host:port"
            )
        rest = bigquery.Client(
            project=project,
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=settings.bigquery_emulator_host),
        )
        # Never let the library build its own Storage client: it would aim at Google's endpoint.
        # No message-size cap, as the library's own channel has: one Arrow batch of a wide table
        # is larger than gRPC's default 4 MiB.
        channel = grpc.insecure_channel(
            settings.bigquery_storage_emulator_host, options=[("grpc.max_receive_message_length", -1)]
        )
        storage = BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))
        return BigQueryClients(project, rest, storage, settings.bigquery_timeout, settings.bigquery_read_timeout,
                               endpoint=f"the emulator at {settings.bigquery_emulator_host} (BIGQUERY_EMULATOR_HOST)",
                               stream_bytes=EMULATOR_STREAM_BYTES)

    credentials = _google_credentials(settings)
    rest = bigquery.Client(project=project, credentials=credentials, location=settings.bigquery_location)
    storage = BigQueryReadClient(credentials=credentials)
    return BigQueryClients(project, rest, storage, settings.bigquery_timeout, settings.bigquery_read_timeout)


def _google_credentials(settings: Settings):  # noqa: ANN202 - google-auth has no public base type here
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError
    from google.oauth2 import service_account

    path = settings.google_application_credentials
    if path is not None:
        if not path.is_file():
            raise CredentialError(f"GOOGLE_APPLICATION_CREDENTIALS: file {path} does not exist or is not a file")
        try:
            return service_account.Credentials.from_service_account_file(
                str(path), scopes=["https://www.googleapis.com/auth/bigquery"]
            )
        except (OSError, ValueError) as exc:
            raise CredentialError(
                f"GOOGLE_APPLICATION_CREDENTIALS: file {path} is not a readable service-account key "
                f"({type(exc).__name__})"
            ) from None
    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/bigquery"])
    except DefaultCredentialsError:
        raise CredentialError(
            "no GCP credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, "
            "or configure application default credentials"
        ) from None
    return credentials


def check_dataset(clients: BigQueryClients, dataset: str, setting: str) -> None:
    """Fail with a credential error naming the setting when a dataset is missing or not permitted."""
    ref = f"{clients.project}.{dataset}"
    try:
        clients.rest.get_dataset(ref, retry=clients.retry, timeout=clients.timeout)
    except gexc.NotFound:
        raise CredentialError(f"BigQuery dataset {ref} not found ({setting}, BIGQUERY_PROJECT)") from None
    except gexc.Forbidden:
        raise CredentialError(f"BigQuery dataset {ref}: permission denied for these credentials") from None
    except gexc.Unauthorized:
        raise CredentialError("BigQuery rejected the credentials (GOOGLE_APPLICATION_CREDENTIALS)") from None
    except _TRANSIENT as exc:
        raise TransientError(f"no answer from {clients.endpoint} within {clients.timeout:g} s (BIGQUERY_TIMEOUT)"
                             f" for dataset {ref}: {type(exc).__name__}") from None


def dataset_exists(clients: BigQueryClients, dataset: str) -> bool:
    try:
        clients.rest.get_dataset(f"{clients.project}.{dataset}", retry=clients.retry, timeout=clients.timeout)
    except gexc.NotFound:
        return False
    return True


def timestamp_literal(value: dt.datetime) -> str:
    """A BigQuery TIMESTAMP literal with all six fractional digits (never truncated to ms)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return "TIMESTAMP '" + value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00:00") + "'"


#: Largest stream of a read session against the emulator (see `BigQueryClients.stream_bytes`).
EMULATOR_STREAM_BYTES = 4 * 1024 * 1024

#: Most streams one read session is split into: past it, streams stay larger than asked.
MAX_SPLIT_STREAMS = 1024

#: Largest Arrow table a read yields. A server may send larger messages; every step after the read
#: (casts, the NUL scrub, dlt's writer) copies what it is given, so each works on slices of this
#: size instead (dlt writes a row group once 1,000 rows are buffered: `runtime/dlt_setup.py`).
READ_SLICE_BYTES = 2 * 1024 * 1024


def _slices(batch: pa.RecordBatch) -> Iterator[pa.Table]:
    """`batch` as tables of at most about READ_SLICE_BYTES each (zero-copy views of it)."""
    rows = max(1, batch.num_rows * READ_SLICE_BYTES // max(batch.nbytes, 1))
    for offset in range(0, batch.num_rows, rows):
        yield pa.Table.from_batches([batch.slice(offset, rows)])


def _detail(exc: gexc.GoogleAPICallError, chars: int = 300) -> str:
    """The server's message, shortened: enough to say what failed, never a whole dump."""
    text = " ".join(str(exc.message or type(exc).__name__).split())
    return text if len(text) <= chars else text[: chars - 3] + "..."


@dataclass
class ReadStats:
    """What one table read cost: rows and the Arrow bytes received."""

    rows: int = 0
    bytes: int = 0
    #: Streams read, after any split.
    streams: int = 0


class TableReader:
    """Reads one table through a Storage Read session: selected columns, a cursor restriction."""

    def __init__(self, clients: BigQueryClients, dataset: str, table: str) -> None:
        if not BQ_NAME.match(table) or not BQ_NAME.match(dataset):
            raise SourceTableMissing(f"not a valid BigQuery table name: {dataset}.{table}")
        self.clients = clients
        self.dataset = dataset
        self.table = table
        self.stats = ReadStats()

    @property
    def ref(self) -> str:
        return f"{self.clients.project}.{self.dataset}.{self.table}"

    def schema(self) -> list[bigquery.SchemaField]:
        """The table's columns; a missing table is a permanent error naming it."""
        try:
            return list(self.clients.rest.get_table(self.ref, retry=self.clients.retry, timeout=self.clients.timeout).schema)
        except gexc.NotFound:
            raise SourceTableMissing(f"source table {self.ref} does not exist") from None

    def _split(self, session: types.ReadSession) -> list[str]:
        """The session's stream names, each split until it carries at most `stream_bytes` of the
        session's estimated bytes. BigQuery answers a split it cannot make with no primary stream,
        and an emulator without SplitReadStream answers UNIMPLEMENTED: that stream, or every
        stream, is then read whole."""
        names = [stream.name for stream in session.streams]
        limit = self.clients.stream_bytes
        estimate = session.estimated_total_bytes_scanned
        if not limit or not names or estimate <= limit * len(names):
            return names
        parts = min(math.ceil(estimate / len(names) / limit), MAX_SPLIT_STREAMS // len(names))
        split: list[str] = []
        # A retried split may have made streams whose answer was lost: they are never read, and a
        # session's streams expire with it (the emulator is the only server split against).
        retry = Retry(predicate=if_transient_error, timeout=self.clients.timeout)
        for rest in names:
            # Cut 1/k off what is left, k = parts .. 2: equal parts, in the stream's own order.
            for k in range(parts, 1, -1):
                try:
                    answer = self.clients.storage.split_read_stream(
                        request=types.SplitReadStreamRequest(name=rest, fraction=1 / k),
                        retry=retry, timeout=self.clients.timeout,
                    )
                except gexc.MethodNotImplemented:
                    parts = 1  # the server cannot split: this stream and the rest are read whole
                    break
                if not answer.primary_stream.name:
                    break
                split.append(answer.primary_stream.name)
                rest = answer.remainder_stream.name
            split.append(rest)
        return split

    def read(
        self, columns: Sequence[str] | None, cursor: str, since: dt.datetime | None
    ) -> Iterator[pa.Table]:
        """Yield Arrow tables of rows whose cursor is at or past `since` (all rows when None).

        `>=`, not `>`: rows that share the checkpoint's timestamp but landed after the last read
        come back, and dlt's incremental drops the ones it has already seen by primary key.
        """
        if not BQ_NAME.match(cursor):
            raise SourceTableMissing(f"not a valid cursor column: {cursor}")
        restriction = f"{cursor} >= {timestamp_literal(since)}" if since is not None else ""
        options = types.ReadSession.TableReadOptions(
            selected_fields=list(columns or []), row_restriction=restriction
        )
        session = types.ReadSession(
            table=f"projects/{self.clients.project}/datasets/{self.dataset}/tables/{self.table}",
            data_format=types.DataFormat.ARROW,
            read_options=options,
        )
        try:
            session = self.clients.storage.create_read_session(
                timeout=self.clients.timeout,
                retry=Retry(predicate=if_transient_error, timeout=self.clients.timeout),
                parent=f"projects/{self.clients.project}", read_session=session, max_stream_count=MAX_READ_STREAMS
            )
            streams = self._split(session)
        except gexc.NotFound as exc:
            # The server's own words too: an emulator answers NOT_FOUND for any failure of its read.
            raise SourceTableMissing(f"BigQuery Storage read of {self.ref}: not found: {_detail(exc)}") from None
        except (gexc.RetryError, gexc.DeadlineExceeded):
            raise TransientError(
                f"BigQuery Storage read of {self.ref}: no answer within {self.clients.timeout:g} s (BIGQUERY_TIMEOUT)"
            ) from None
        except _TRANSIENT as exc:
            raise TransientError(f"BigQuery Storage read of {self.ref} failed: {type(exc).__name__}") from None
        schema = pa.ipc.read_schema(pa.py_buffer(session.arrow_schema.serialized_schema))
        # Streams are read one after another: reading them from parallel threads was measured
        # slower on two cores (1M transcript rows from the emulator: 0.8M rows/s in turn,
        # 0.4-0.5M rows/s in parallel), as decoding competes with the server and the loader.
        self.stats.streams += len(streams)
        for stream in streams:
            # The stream object resumes at its offset when the connection drops mid-read (the
            # emulator ignores the offset and starts again: rows read twice land once, on their key).
            try:
                for response in self.clients.storage.read_rows(stream, timeout=self.clients.read_timeout):
                    payload = response.arrow_record_batch.serialized_record_batch
                    del response  # the message holds a second copy of the payload while it is read
                    batch = pa.ipc.read_record_batch(pa.py_buffer(payload), schema)
                    self.stats.rows += batch.num_rows
                    self.stats.bytes += batch.nbytes
                    yield from _slices(batch)
            except gexc.DeadlineExceeded:
                raise TransientError(
                    f"BigQuery Storage read of {self.ref}: stream not done within "
                    f"{self.clients.read_timeout:g} s (BIGQUERY_READ_TIMEOUT)"
                ) from None

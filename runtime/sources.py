"""Where each source table is read from in this warehouse, and whether a selection's tables are there.

One set of rules for the run, `--plan` and `--check`: the table-name setting, then a missing
dataset's fallback dataset or stand-in; anything else missing is an error naming the settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from google.api_core import exceptions as gexc

from assets.errors import ConfigError, TransientError
from assets.spec import AssetSpec, SourceTable
from runtime.bigquery import BigQueryClients, dataset_exists
from runtime.schema import missing_columns
from runtime.settings import Settings


class SourcesMissing(ConfigError):
    """Source tables (or the columns an asset cannot do without) that the selection needs are not
    in the warehouse: a setting to fix, found before any work."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where a source table is read from, or that a stand-in replaces it; `note` says why when it
    is not the table's own dataset."""

    source: SourceTable
    dataset: str
    table: str
    stand_in: bool = False
    note: str = ""


def resolve(
    source: SourceTable, settings: Settings, clients: BigQueryClients, datasets: dict[str, bool] | None = None
) -> ResolvedSource:
    """Apply the table-name setting and the missing-dataset rules (fallback, stand-in).

    `datasets` caches whether each dataset exists across calls; a missing dataset without a rule
    resolves to its table there, which then does not exist.
    """
    datasets = {} if datasets is None else datasets
    table = getattr(settings, source.table_setting) if source.table_setting else source.table
    dataset = settings.dataset(source.dataset)
    if dataset not in datasets:
        datasets[dataset] = dataset_exists(clients, dataset)
    if datasets[dataset]:
        return ResolvedSource(source, dataset, table)
    if source.fallback_dataset:
        fallback = settings.dataset(source.fallback_dataset)
        return ResolvedSource(source, fallback, table, note=f"no dataset {dataset}: read {fallback}.{table} instead")
    if source.stand_in:
        return ResolvedSource(source, dataset, table, stand_in=True,
                              note=f"no dataset {dataset}: {source.raw_table} stays empty")
    return ResolvedSource(source, dataset, table, note=f"no dataset {dataset}")


def settings_naming(source: SourceTable) -> str:
    """The settings that name a source table, for messages."""
    dataset = {"gong": "GONG_DATASET", "salesforce": "SALESFORCE_DATASET"}[source.dataset]
    return f"{dataset}, {source.table_setting.upper()}" if source.table_setting else dataset


@dataclass(frozen=True)
class SourceCheck:
    """What one source table of a selection looks like in the warehouse."""

    spec: AssetSpec
    source: SourceTable
    label: str  # "dataset.table"
    ok: bool
    detail: str  # for a problem: what is wrong, starting with the table's full name
    transient: bool = False  # BigQuery did not answer: nothing is known
    hint: str = ""  # for an operator checking the setup: the other way out


def inspect_sources(settings: Settings, clients: BigQueryClients, specs: Iterable[AssetSpec]) -> Iterator[SourceCheck]:
    """Each source table the selection reads, once: there, missing, unreadable, or lacking a column
    its asset cannot do without. One metadata call per table; optional tables (stand-ins) may be
    missing. Shared by the command line's preflight and `--check`."""
    datasets: dict[str, bool] = {}
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        for source in spec.sources:
            try:
                place = resolve(source, settings, clients, datasets)
            except (gexc.GoogleAPICallError, gexc.RetryError, OSError) as exc:
                yield SourceCheck(spec, source, source.table, False, f"BigQuery did not answer ({type(exc).__name__})",
                                  transient=True)
                continue
            if (place.dataset, place.table) in seen:
                continue
            seen.add((place.dataset, place.table))
            label, ref = f"{place.dataset}.{place.table}", f"{clients.project}.{place.dataset}.{place.table}"
            if place.stand_in:
                yield SourceCheck(spec, source, label, True, place.note)
                continue
            try:
                table = clients.rest.get_table(ref, retry=clients.retry, timeout=clients.timeout)
            except gexc.NotFound:
                if source.stand_in:
                    yield SourceCheck(spec, source, label, True, f"does not exist: {source.raw_table} stays empty")
                else:
                    yield SourceCheck(spec, source, label, False, f"{ref} does not exist "
                                      f"({place.note + '; ' if place.note else ''}set {settings_naming(source)})",
                                      hint="or ask for read access")
                continue
            except (gexc.Forbidden, gexc.Unauthorized):
                yield SourceCheck(spec, source, label, False, f"{ref}: permission denied for these credentials")
                continue
            except (gexc.GoogleAPICallError, gexc.RetryError, OSError) as exc:
                yield SourceCheck(spec, source, label, False, f"cannot read its metadata ({type(exc).__name__})",
                                  transient=True)
                continue
            required, _ = missing_columns(source, list(table.schema))
            if required:
                yield SourceCheck(spec, source, label, False,
                                  f"{ref} lacks column(s) {', '.join(required)}, which {spec.name} cannot do without")
            else:
                yield SourceCheck(spec, source, label, True, "exists" + (f" ({place.note})" if place.note else ""))


def check_sources(settings: Settings, clients: BigQueryClients, specs: Iterable[AssetSpec]) -> None:
    """Raise SourcesMissing naming every source table the selection needs that is not there (or
    lacks a column its asset cannot do without); a TransientError when BigQuery did not answer."""
    problems: list[str] = []
    for check in inspect_sources(settings, clients, specs):
        if check.transient:
            raise TransientError(f"BigQuery did not answer for source {check.source.table}: {check.detail}")
        if not check.ok:
            problems.append(f"{check.spec.name}: source table {check.detail}")
    if problems:
        raise SourcesMissing("; ".join(problems) + " (narrow the selection with --asset to run the rest)")

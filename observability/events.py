"""What the runtime tells its hooks: plain records, so observability never imports the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunInfo:
    """One run of the flow: what was selected and its identifiers."""

    run_id: str
    selection: str
    assets: tuple[str, ...]
    flow_run_id: str | None = None
    trace_id: str | None = None


@dataclass
class AssetOutcome:
    """How one asset's materialization ended."""

    asset: str
    status: str = "pending"  # success | failed | skipped
    rows_read: int = 0
    rows_loaded: int = 0
    rows_written: int = 0
    rows_deleted: int = 0
    rows_dead_lettered: int = 0
    #: Raw rows a key reconciliation found gone from the source (marked deleted).
    rows_reconciled: int = 0
    #: Rows of other tables that went with this asset's deletes (cascades): `schema.table` → rows.
    cascade: dict[str, int] = field(default_factory=dict)
    schema_changes: int = 0
    bytes_read: int = 0
    duration_s: float = 0.0
    checkpoint_before: dict[str, str | None] = field(default_factory=dict)
    checkpoint_after: dict[str, str | None] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None
    step: str | None = None

    @property
    def rows_synced(self) -> int:
        """Destination rows the asset changed: written plus deleted."""
        return self.rows_written + self.rows_deleted

    @property
    def errors(self) -> int:
        """The asset's errors, as sync_status, sync_runs and the metrics count them: dead-lettered
        rows, plus one if the asset failed."""
        return self.rows_dead_lettered + (1 if self.status == "failed" else 0)

    @property
    def checkpoint(self) -> str | None:
        """The latest cursor value among the asset's source tables, for one-line summaries."""
        values = [v for v in self.checkpoint_after.values() if v]
        return max(values) if values else None

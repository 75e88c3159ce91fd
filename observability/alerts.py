"""Alerts when an asset fails after its retries: a Slack message and a PagerDuty incident per asset.

Slack gets one incoming-webhook message per failed run, naming each failed asset, its step, its
error and the checkpoint it stays at. PagerDuty gets an Events API v2 `trigger` per failed asset
with a dedup key of its own, so one asset failing hour after hour stays one incident, and a
`resolve` with the same key when the asset next succeeds. A sender that fails is logged and
ignored: an alert must never hide the failure it reports. Texts carry no secret: the routing key,
the webhook URL and any URL password are removed from every string that leaves.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence


from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook

PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
#: PagerDuty truncates longer summaries; Slack sections hold at most 3000 characters.
SUMMARY_CHARS = 1024
SECTION_CHARS = 2900
#: `scheme://user:password@`: the password goes, the rest of the URL stays readable.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@")

log = logging.getLogger("gong_sync.alerts")


class _HideSecrets(logging.Filter):
    """httpx logs every request's URL at INFO; a Slack webhook URL is a secret: mask it there."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(secret in text for secret in self.secrets):
            for secret in self.secrets:
                text = text.replace(secret, "***")
            record.msg, record.args = text, ()
        return True


_HTTPX_FILTER = _HideSecrets()
logging.getLogger("httpx").addFilter(_HTTPX_FILTER)


class AlertHook(Hook):
    """Sends the alerts that are configured: Slack (a webhook URL), PagerDuty (a routing key)."""

    def __init__(
        self,
        *,
        slack_webhook_url: str | None = None,
        pagerduty_routing_key: str | None = None,
        pagerduty_events_url: str = PAGERDUTY_EVENTS_URL,
        severity: str = "error",
        source: str = "gong-sync",
        run_link: Callable[[RunInfo], str | None] | None = None,
        timeout_s: float = 10.0,
        secrets: Sequence[str] = (),
    ) -> None:
        self.slack_webhook_url = slack_webhook_url or None
        self.routing_key = pagerduty_routing_key or None
        self.events_url = pagerduty_events_url
        self.severity = severity
        self.source = source
        self.run_link = run_link or (lambda run: None)
        self.timeout_s = timeout_s
        self._secrets = [s for s in (*secrets, slack_webhook_url, pagerduty_routing_key) if s]
        if self.slack_webhook_url:
            _HTTPX_FILTER.secrets.add(self.slack_webhook_url)

    # -- hook methods ----------------------------------------------------------------------

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None:
        if not self.routing_key:
            return
        if outcome.status == "failed":
            self._pagerduty(self._trigger(run, outcome), f"trigger for {outcome.asset}")
        elif outcome.status == "success":
            # PagerDuty drops a resolve for a key with no open incident, so every success sends one.
            self._pagerduty(
                {"routing_key": self.routing_key, "event_action": "resolve", "dedup_key": self.dedup_key(outcome.asset)},
                f"resolve for {outcome.asset}",
            )

    def run_finished(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> None:
        failed = [o for o in outcomes if o.status == "failed"]
        if error is not None and self.routing_key:
            # The run itself broke (not one asset): one incident for the run as a whole.
            self._pagerduty(self._run_trigger(run, error), "trigger for the run")
        if (failed or error is not None) and self.slack_webhook_url:
            self._post("Slack", self.slack_webhook_url, self._slack_message(run, outcomes, error))

    def notice(self, run: RunInfo, topic: str, text: str) -> None:
        summary = self.clean(f"gong-sync ({self.source}): {text}")
        if self.slack_webhook_url:
            self._post("Slack", self.slack_webhook_url, {"text": summary[:SECTION_CHARS]}, f"notice {topic}")
        if self.routing_key:
            self._pagerduty({
                "routing_key": self.routing_key, "event_action": "trigger", "dedup_key": self.dedup_key(topic),
                "client": "gong-sync",
                "payload": {"summary": summary[:SUMMARY_CHARS], "source": self.source, "severity": "warning",
                            "group": "gong-sync", "class": topic, "custom_details": {"run_id": run.run_id}},
            }, f"notice {topic}")

    # -- messages --------------------------------------------------------------------------

    def dedup_key(self, asset: str) -> str:
        """One incident per asset and destination: the same failure every hour stays one incident."""
        return f"gong-sync:{self.source}:{asset}"

    def _summary(self, outcome: AssetOutcome) -> str:
        return self.clean(
            f"gong-sync: {outcome.asset} failed at {outcome.step or 'run'}: {outcome.error_type or 'Error'}: {outcome.error}"
        )[:SUMMARY_CHARS]

    def _trigger(self, run: RunInfo, outcome: AssetOutcome) -> dict:
        link = self.run_link(run)
        event = {
            "routing_key": self.routing_key,
            "event_action": "trigger",
            "dedup_key": self.dedup_key(outcome.asset),
            "client": "gong-sync",
            "payload": {
                "summary": self._summary(outcome),
                "source": self.source,
                "severity": self.severity,
                "component": outcome.asset,
                "group": "gong-sync",
                "class": outcome.error_type or "Error",
                "custom_details": {
                    "run_id": run.run_id,
                    "asset": outcome.asset,
                    "step": outcome.step,
                    "error": self.clean(outcome.error or ""),
                    "checkpoint": outcome.checkpoint_after or None,
                    "rows_loaded": outcome.rows_loaded,
                },
            },
        }
        if link:
            event["client_url"] = link
            event["links"] = [{"href": link, "text": "the run"}]
        return event

    def _run_trigger(self, run: RunInfo, error: BaseException) -> dict:
        link = self.run_link(run)
        event = {
            "routing_key": self.routing_key,
            "event_action": "trigger",
            "dedup_key": self.dedup_key("run"),
            "client": "gong-sync",
            "payload": {
                "summary": self.clean(f"gong-sync run failed: {type(error).__name__}: {error}")[:SUMMARY_CHARS],
                "source": self.source,
                "severity": self.severity,
                "group": "gong-sync",
                "class": type(error).__name__,
                "custom_details": {"run_id": run.run_id, "selection": run.selection},
            },
        }
        if link:
            event["client_url"] = link
            event["links"] = [{"href": link, "text": "the run"}]
        return event

    def _slack_message(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> dict:
        failed = [o for o in outcomes if o.status == "failed"]
        skipped = [o.asset for o in outcomes if o.status == "skipped"]
        link = self.run_link(run)
        headline = f"gong-sync run {run.run_id} failed ({self.source}): " + (
            f"{len(failed)} asset(s) failed: {', '.join(o.asset for o in failed)}" if failed
            else f"{type(error).__name__}: {error}"
        )
        if skipped:
            headline += f"; skipped: {', '.join(skipped)}"
        lines = [
            f"*{o.asset}* failed at `{o.step or 'run'}`: {o.error_type or 'Error'}: {o.error}\n"
            f"checkpoint stays at {o.checkpoint or 'none'}"
            for o in failed
        ]
        blocks: list[dict] = [{"type": "section", "text": {"type": "mrkdwn", "text": self.clean(headline)[:SECTION_CHARS]}}]
        blocks += [{"type": "section", "text": {"type": "mrkdwn", "text": self.clean(line)[:SECTION_CHARS]}} for line in lines]
        if link:
            blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{link}|Open the run>"}]})
        text = self.clean(headline + ("\n" + "\n".join(lines) if lines else "") + (f"\n{link}" if link else ""))
        return {"text": text, "blocks": blocks}

    def clean(self, text: str) -> str:
        """The text with every known secret and any URL password removed."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _URL_PASSWORD.sub(r"\1***@", text)

    # -- sending ---------------------------------------------------------------------------

    def _pagerduty(self, event: dict, what: str) -> None:
        self._post("PagerDuty", self.events_url, event, what)

    def _post(self, channel: str, url: str, body: dict, what: str = "message") -> None:
        # Neither the URL (a Slack webhook URL is itself a secret) nor the body goes to the log.
        import httpx  # here, not at the top: it imports its CLI's libraries, ~0.15 s every run

        try:
            response = httpx.post(url, json=body, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            log.warning("%s alert (%s) not sent: %s", channel, what, type(exc).__name__)
            return
        if response.status_code >= 300:
            log.warning("%s alert (%s) not sent: HTTP %d", channel, what, response.status_code)
        else:
            log.info("%s alert (%s) sent", channel, what)

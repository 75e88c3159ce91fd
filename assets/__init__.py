"""Every destination table of the project, declared as an asset node."""

from assets import call_opportunities, calls, emails, opportunities, speakers, transcripts, users
from assets.spec import AssetSpec

ALL_ASSETS: tuple[AssetSpec, ...] = (
    users.ASSET,
    calls.ASSET,
    transcripts.ASSET,
    speakers.ASSET,
    opportunities.ASSET,
    emails.ASSET,
    call_opportunities.ASSET,
)

__all__ = ["ALL_ASSETS", "AssetSpec"]

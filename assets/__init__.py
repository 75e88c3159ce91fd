"""Every destination table of the project, declared as an asset node."""

from assets import calls, speakers, transcripts, users
from assets.spec import AssetSpec

ALL_ASSETS: tuple[AssetSpec, ...] = (users.ASSET, calls.ASSET, transcripts.ASSET, speakers.ASSET)

__all__ = ["ALL_ASSETS", "AssetSpec"]

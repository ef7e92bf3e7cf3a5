"""antiphon: several checkpoints of one model family take turns writing one response.

`antiphon.Client` / `antiphon.AsyncClient` talk to a running server (`antiphon serve`); they
are imported on first use so `import antiphon` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from antiphon.client import AsyncClient, Client


def __getattr__(name: str) -> object:
    if name in ("Client", "AsyncClient"):
        from antiphon import client

        return getattr(client, name)
    raise AttributeError(f"module 'antiphon' has no attribute {name!r}")


__all__ = ["AsyncClient", "Client", "__version__"]

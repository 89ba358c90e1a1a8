"""Fetching interventions from the Hugging Face hub (or its local cache).

Downloads go through ``huggingface_hub.snapshot_download`` and so share its cache
(``HF_HUB_CACHE``/``HF_HOME``, layout ``models--org--name/{refs,snapshots,blobs}``). With
``HF_HUB_OFFLINE=1`` the cached snapshot is used and nothing touches the network.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from .errors import InterventionFormatError

#: Files an intervention repository may need: configs, weights and model cards; nothing else.
DEFAULT_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.pt", "*.md")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(@[A-Za-z0-9_./-]{1,200})?$")


def looks_like_hub_id(source: str) -> bool:
    """True for ``org/name`` or ``org/name@revision``."""
    return bool(_HUB_ID.match(source)) and ".." not in source


def split_hub_id(source: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; no ``@`` gives revision ``None``."""
    repo_id, _, revision = source.partition("@")
    return repo_id, revision or None


def download_from_hub(repo_id: str, revision: str | None = None, *,
                      allow_patterns=DEFAULT_ALLOW_PATTERNS, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the local snapshot directory of ``repo_id`` at ``revision``, downloading if needed."""
    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=list(allow_patterns),
                                 cache_dir=cache_dir)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise InterventionFormatError(f"hub repository {shown!r} was not found (or is private/gated)",
                                      param="source", code="source_not_found") from exc
    except RevisionNotFoundError as exc:
        raise InterventionFormatError(f"hub repository {repo_id!r} has no revision {revision!r}",
                                      param="source", code="source_not_found") from exc
    except LocalEntryNotFoundError as exc:
        raise InterventionFormatError(f"hub repository {shown!r} is not in the local cache and the hub cannot be "
                                      "reached (HF_HUB_OFFLINE is set or the network is down)",
                                      param="source", code="source_not_found") from exc
    except HFValidationError as exc:
        raise InterventionFormatError(f"invalid hub id {shown!r}: {exc}", param="source") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise InterventionFormatError(f"could not fetch hub repository {shown!r}: {exc.__class__.__name__}: "
                                      f"{str(exc)[:200]}", param="source", code="source_unavailable") from exc
    return Path(path)

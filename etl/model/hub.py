"""The Hugging Face hub, asked briefly: when it does not answer, the process's clients are
switched to their local cache (no retries), and it is not asked again."""

from __future__ import annotations

from pathlib import Path

HUB_PROBE_TIMEOUT_S = 3.0
"""Seconds the one reachability request to the hub may take before it counts as offline."""



def _go_offline() -> None:
    """Switch this process's Hugging Face clients to their local cache (no requests)."""
    import sys

    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True


def hub_reachable() -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers.

    One request with a ``HUB_PROBE_TIMEOUT_S`` timeout and no retries; any HTTP answer counts
    as reachable. With ``HF_HUB_OFFLINE=1`` nothing is sent and the answer is False. When
    the hub does not answer, the process's Hugging Face clients are switched to offline mode
    (so that cached models and datasets load without the clients' retries), which also
    answers every later call without a request.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    from huggingface_hub import get_session  # the hub client's own, without its retries

    try:
        get_session().head(constants.ENDPOINT.rstrip("/") + "/api/models",
                           timeout=HUB_PROBE_TIMEOUT_S, follow_redirects=False)
        return True
    except Exception:  # no answer at all: refused, timed out, bad proxy or endpoint
        _go_offline()
        return False


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it came from) says the hub could not be reached
    or that a file is neither cached nor allowed to be downloaded (offline mode)."""
    import importlib

    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kinds: tuple[type, ...] = (LocalEntryNotFoundError, OfflineModeIsEnabled)
    for module in ("httpx2", "httpx"):  # the hub client's HTTP library (by version)
        try:
            kinds += (importlib.import_module(module).TransportError,)
        except (ImportError, AttributeError):
            pass
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, kinds):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def quiet_libraries() -> None:
    """Hide the progress bars that transformers and datasets draw on their own."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def cached_snapshot(name: str) -> Path | None:
    """The folder of the hub model ``name`` in the local Hugging Face cache (its
    ``config.json`` and weight files, as loaded), or None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001  (an id the cache cannot hold: nothing to look at)
        return None
    return Path(config).parent if isinstance(config, str) else None

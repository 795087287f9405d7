"""Is the Hugging Face Hub usable right now? Decided once per process, in a few seconds at most.

Without a network, huggingface_hub retries every file request with exponential back-off (about 25 s per file, and a
diffusers model asks for several), and only then gives up. The loaders here therefore ask first: when
``HF_HUB_OFFLINE`` is set, or one request to the Hub's endpoint gets no answer within ``PROBE_TIMEOUT_S``, they load
with ``local_files_only=True`` (the local cache still serves models downloaded before) and fail at once otherwise.
"""

from __future__ import annotations

import urllib.request
import warnings
from contextlib import contextmanager

PROBE_TIMEOUT_S = 3.0
OFFLINE_HINT = ("download it once where the Hub is reachable and set HF_HUB_OFFLINE=1 to use the cached copy "
                "without asking the network")

_probe: str | None = None  # "" = the Hub answered; otherwise why it is not usable


def offline_reason() -> str | None:
    """None if the Hub can be asked; otherwise why not (HF_HUB_OFFLINE, or no answer from the endpoint)."""
    global _probe
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return "HF_HUB_OFFLINE is set"
    if _probe is None:
        _probe = _ask(constants.ENDPOINT)
    return _probe or None


def _ask(endpoint: str) -> str:
    """One HEAD request, no retries: "" if any HTTP answer below 500 comes back, else the reason."""
    try:
        try:
            from huggingface_hub.utils import get_session  # the Hub client's own session: proxies, certificates
        except ImportError:  # pragma: no cover - older huggingface_hub
            get_session = None
        if get_session is not None:
            status = get_session().head(endpoint, timeout=PROBE_TIMEOUT_S).status_code
        else:  # pragma: no cover

            with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_TIMEOUT_S) as r:
                status = r.status
    except Exception as err:  # DNS failure, refused connection, timeout, TLS error, ...
        return f"the Hub ({endpoint}) cannot be reached ({type(err).__name__})"
    return "" if status < 500 else f"the Hub ({endpoint}) answers HTTP {status}"


@contextmanager
def quiet_hub_calls():
    """Silence one warning that third-party code, not ours, raises on every file request: diffusers still passes
    huggingface_hub's deprecated ``local_dir_use_symlinks`` argument (a no-op)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The `local_dir_use_symlinks` argument is deprecated",
                                category=UserWarning)
        yield

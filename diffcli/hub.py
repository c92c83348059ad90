"""Whether the hub can be used (offline variables, else one short connection probe per process), so that an
offline machine reads the local cache at once instead of waiting out the hub clients' retries."""

from __future__ import annotations

import functools
import os
import socket
import threading
import urllib.parse
import urllib.request
from contextlib import contextmanager
from typing import Iterator

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 2.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().upper() in _TRUE


def offline_variable(*, datasets: bool = False) -> str | None:
    """The variable that switches the hub off (`NAME=value`), read now; HF_DATASETS_OFFLINE decides for datasets."""
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
    if datasets and _env_flag("HF_DATASETS_OFFLINE") is not None:  # datasets lets it override HF_HUB_OFFLINE
        names = ["HF_DATASETS_OFFLINE"]
    for name in names:
        if _env_flag(name):
            return f"{name}={os.environ[name]}"
    return None


def probe_target() -> tuple[str, int, str]:
    """(host, port, what) the probe connects to: the endpoint in HF_ENDPOINT, or the proxy that would carry it."""
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    scheme = url.scheme or "https"
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if p.hostname:
            proxy_port = p.port or (443 if p.scheme == "https" else 80)
            return p.hostname, proxy_port, f"the proxy {p.hostname}:{proxy_port}"
    return host, port, f"{host}:{port}"


@functools.lru_cache(maxsize=None)
def _probe(host: str, port: int, seconds: float) -> str | None:
    """None when a TCP connection opens within `seconds` (name lookup included), else why not."""
    outcome: list[str | None] = [f"no answer within {seconds:g} s"]

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            outcome[0] = None
        except OSError as exc:
            outcome[0] = exc.strerror or str(exc) or type(exc).__name__

    worker = threading.Thread(target=connect, name="diffprune-hub-probe", daemon=True)
    worker.start()
    worker.join(seconds)  # getaddrinfo ignores socket timeouts; the thread bounds the name lookup too
    return outcome[0]


def unavailable(*, datasets: bool = False) -> str | None:
    """Why the hub cannot be used now (an offline variable: no probe at all; or the cached probe failed), else None."""
    variable = offline_variable(datasets=datasets)
    if variable is not None:
        return f"{variable} is set"
    host, port, what = probe_target()
    failure = _probe(host, port, PROBE_SECONDS)
    return None if failure is None else f"{what} is unreachable ({failure})"


@contextmanager
def datasets_offline() -> Iterator[None]:
    """Run `datasets` (and the huggingface_hub under it) in their offline mode: cached copies only, no retries."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved

"""pytest plugin: the ``hub_server`` fixture, an in-memory Hub the real ``huggingface_hub`` talks to.

Load it with ``pytest_plugins = ["tests.conftest_hub"]`` (in a test module or the root conftest).
The fixture is function-scoped: every test gets an empty server and an empty HF_HOME.

``huggingface_hub`` reads most of its configuration once, at import time, into
``huggingface_hub.constants`` (and a few copies elsewhere), so setting environment variables is not
enough: the fixture sets them (for subprocesses, e.g. a CLI run, and for the few values read at call
time such as ``HF_TOKEN``) *and* patches the module attributes the client reads at call time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub_server import TEST_TOKEN, HubServer

# Environment variables that would change which token is sent, or send requests elsewhere.
_UNSET_ENV = (
    "HUGGING_FACE_HUB_TOKEN",
    "HF_OIDC_RESOURCE",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HUGGINGFACE_CO_STAGING",
    "TRANSFORMERS_OFFLINE",
)


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A started ``HubServer``; the ``huggingface_hub`` client is pointed at it for the test."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_assets, _cache_manager, _http

    server = HubServer().start()
    home = tmp_path / "hf_home"
    cache, assets, xet = home / "hub", home / "assets", home / "xet"
    token_path = home / "token"

    for name in _UNSET_ENV:
        monkeypatch.delenv(name, raising=False)
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": TEST_TOKEN,  # read from os.environ at call time by get_token()
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(assets),
        "HF_XET_CACHE": str(xet),
        "HF_TOKEN_PATH": str(token_path),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    # Module attributes computed at import time from the environment.
    attrs = {
        "ENDPOINT": server.url,  # HfApi(), hf_hub_url(), lfs, _commit_api, snapshot_download
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,  # checked by the request hook of every HTTP call
        "HF_HUB_DISABLE_XET": True,  # upload/download with plain HTTP + LFS, not hf_xet
        "HF_HUB_DISABLE_TELEMETRY": True,  # no /api/agent-harnesses call, no telemetry thread
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,  # send HF_TOKEN by default
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),  # default cache_dir of hf_hub_download / snapshot_download
        "HF_ASSETS_CACHE": str(assets),
        "HF_XET_CACHE": str(xet),
        "HF_TOKEN_PATH": str(token_path),  # never read or write the developer's saved token
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
    }
    for name, value in attrs.items():
        monkeypatch.setattr(constants, name, value)
    # Copies made at import time elsewhere: the module-level HfApi behind create_repo(),
    # upload_file()... (HfApi objects created before the fixture keep their old endpoint), and the
    # defaults of scan_cache_dir() and cached_assets_path().
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", str(assets))
    origins = _http._HUB_ORIGINS | {_http._url_origin(server.url)}
    monkeypatch.setattr(_http, "_HUB_ORIGINS", origins)  # keep auth on same-hub redirects

    _http.close_session()  # a fresh shared client picks up NO_PROXY and has no pooled connections
    try:
        yield server
    finally:
        _http.close_session()  # drop keep-alive connections to this server
        server.stop()
    assert not server.errors, "the fake Hub crashed:\n" + "\n".join(server.errors)

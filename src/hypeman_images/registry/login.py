"""Storing a registry credential the way ``docker login`` does, and forgetting it.

The file written is docker's ``config.json`` (:func:`.credentials.docker_config_path`),
which :mod:`.credentials` reads back, as docker and podman do; a
``credHelpers`` entry or ``credsStore`` in it takes the secret instead
(``docker-credential-<name> store``/``erase``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypeman_images.errors import StorageError
from hypeman_images.registry.credentials import (
    AuthFile,
    display_path,
    docker_config_path,
    helper_server_url,
    registry_key,
)


def login(
    registry: str,
    username: str,
    password: str,
    *,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Save a credential for ``registry`` the way ``docker login`` does; return where.

    ``registry`` is a host: docker's ``config.json`` has no namespaced keys
    (containers/image too refuses to write one into a docker-format file).

    A ``credHelpers`` entry or ``credsStore`` in the file receives it through
    ``docker-credential-<name> store``; otherwise it goes into ``auths`` as
    base64 ``user:password``. The file is replaced atomically with mode 0600.
    Checking the credential against the registry is the caller's business
    (see ``RegistryClient.check_login``).
    """
    path = config_path or docker_config_path(env)
    doc = AuthFile(path, env=env).load()
    key = helper_server_url(registry)
    helper = AuthFile(path, env=env).helper_for(doc, registry_key(registry))
    if helper is not None:
        helper.store(registry, username, password)
        auths = doc.setdefault("auths", {})
        auths[key] = {}  # docker keeps an empty marker entry for helper-stored logins
        _write_json_atomic(path, doc)
        return helper.program
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    doc.setdefault("auths", {})
    _drop_keys(doc["auths"], registry)
    doc["auths"][key] = {"auth": auth}
    _write_json_atomic(path, doc)
    return display_path(path)


def logout(
    registry: str, *, config_path: Path | None = None, env: Mapping[str, str] | None = None
) -> bool:
    """Forget ``registry``'s credential (helper and ``auths``); False if there was none."""
    path = config_path or docker_config_path(env)
    file = AuthFile(path, env=env)
    doc = file.load()
    helper = file.helper_for(doc, registry_key(registry))
    removed = helper.erase(registry) if helper is not None else False
    if _drop_keys(doc.get("auths") or {}, registry):
        removed = True
        _write_json_atomic(path, doc)
    return removed


def _drop_keys(auths: dict[str, Any], registry: str) -> bool:
    keys = [k for k in auths if registry_key(k) == registry_key(registry)]
    for k in keys:
        del auths[k]
    return bool(keys)


def _write_json_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` to ``path`` via an fsynced temp file and rename; mode 0600."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(doc, out, indent="\t")
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise StorageError(f"cannot write {display_path(path)}: {exc.strerror or exc}") from exc

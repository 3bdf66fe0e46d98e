"""The CLI's stored credentials: one API token per farm, in the user's config folder.

The file is ``click.get_app_dir("renderfarm")/credentials.json`` (on Linux
``$XDG_CONFIG_HOME/renderfarm`` or ``~/.config/renderfarm``)::

    {"servers": {"http://127.0.0.1:3000": {"token": "rfp_...", "username": "admin", "token_id": "..."}}}

The folder is kept at mode 0700 and the file at 0600; the file is replaced atomically
(a 0600 temp file in the same folder, then ``os.replace``) under an advisory lock, so
two commands storing tokens at once do not lose one. ``RENDERFARM_TOKEN`` overrides the
stored token for every server.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no advisory lock)
    fcntl = None  # type: ignore[assignment]

APP_NAME = "renderfarm"
ENV_TOKEN = "RENDERFARM_TOKEN"  # noqa: S105  (the name of an environment variable)
FILE_NAME = "credentials.json"


class CredentialsError(Exception):
    """The credentials file cannot be read or written (the message says which file and why)."""


def credentials_dir() -> Path:
    """The folder of the credentials file (honours ``XDG_CONFIG_HOME`` as click does)."""
    return Path(click.get_app_dir(APP_NAME))


def credentials_path() -> Path:
    """The credentials file (it may not exist yet)."""
    return credentials_dir() / FILE_NAME


def server_key(server: str) -> str:
    """The key a server's entry is stored under: its URL without trailing slashes."""
    return server.rstrip("/")


def _fix_mode(path: Path, wanted: int, what: str) -> None:
    """Warn about and tighten a file that others may read (POSIX only)."""
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        click.echo(
            f"warning: {what} {path} was readable by other users (mode {mode:o}); set it to "
            f"{wanted:o}. If others could read it, revoke its tokens (renderfarm logout) and log in again.",
            err=True,
        )
        os.chmod(path, wanted)


def load() -> dict[str, Any]:
    """The stored credentials, ``{"servers": {url: {"token", "username", "token_id"}}}``.

    A missing file reads as no servers. A file readable by others is reported on
    stderr and set back to 0600.

    Raises:
        CredentialsError: the file cannot be read or is not the expected JSON.
    """
    path = credentials_path()
    try:
        with open(path, encoding="utf-8") as fh:
            _fix_mode(path, 0o600, "credentials file")
            data = json.load(fh)
    except FileNotFoundError:
        return {"servers": {}}
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CredentialsError(
            f"{path} is not valid JSON ({exc}); fix it or delete it and log in again"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("servers", {}), dict):
        raise CredentialsError(f'{path} is not {{"servers": {{...}}}}; fix it or delete it and log in again')
    data.setdefault("servers", {})
    return data


def _write(data: dict[str, Any]) -> None:
    folder = credentials_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name == "posix":
        os.chmod(folder, 0o700)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".credentials.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / FILE_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    folder = credentials_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(folder / ".credentials.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _update(change: Any) -> Any:
    """Read, ``change(servers)`` in place, write back, under the lock; returns what ``change`` returns."""
    try:
        with _locked():
            data = load()
            result = change(data["servers"])
            _write(data)
            return result
    except OSError as exc:
        raise CredentialsError(f"cannot write {credentials_path()}: {exc.strerror or exc}") from exc


def stored(server: str) -> dict[str, Any] | None:
    """The stored entry of ``server`` (``{"token", "username", "token_id"}``), or None.

    Raises:
        CredentialsError: the file cannot be read.
    """
    entry = load()["servers"].get(server_key(server))
    return entry if isinstance(entry, dict) and entry.get("token") else None


def store(server: str, token: str, username: str, token_id: str | None) -> Path:
    """Store (replace) the token of ``server``; returns the file's path.

    Raises:
        CredentialsError: the file cannot be read or written.
    """

    def change(servers: dict[str, Any]) -> None:
        servers[server_key(server)] = {"token": token, "username": username, "token_id": token_id or ""}

    _update(change)
    return credentials_path()


def forget(server: str) -> dict[str, Any] | None:
    """Remove the entry of ``server``; returns it (None when there was none).

    Raises:
        CredentialsError: the file cannot be read or written.
    """
    if server_key(server) not in load()["servers"]:
        return None
    return _update(lambda servers: servers.pop(server_key(server), None))


def token_source(server: str) -> str | None:
    """Where :func:`token_for` finds the token: ``"RENDERFARM_TOKEN"``, the file's path, or None."""
    if os.environ.get(ENV_TOKEN):
        return ENV_TOKEN
    try:
        return str(credentials_path()) if stored(server) else None
    except CredentialsError:
        return None


def _bad_char(token: str) -> tuple[int, str] | None:
    """The first character that cannot be in a token (anything but printable ASCII other than
    space), as ``(position, description)``; None when there is none."""
    for i, ch in enumerate(token):
        if "!" <= ch <= "~":
            continue
        if ch == " ":
            what = "a space"
        elif ch.isspace() or unicodedata.category(ch).startswith("C"):
            what = f"the control character {ch!r}"
        else:
            what = f"the non-ASCII character {ch!r}"
        return i, what
    return None


def checked_token(token: str, source: str, fix: str) -> str:
    """``token`` without surrounding whitespace, checked to fit an HTTP header.

    Args:
        token: the token as found.
        source: where it was found, for the message (e.g. ``RENDERFARM_TOKEN``).
        fix: what the user should do about a bad token, for the message.

    Raises:
        CredentialsError: the token is blank, or holds a space, a control character
            (a newline, a tab ...) or a non-ASCII character inside it. The message names
            ``source`` and the character's position, never the token.
    """
    clean = token.strip()
    if not clean:
        raise CredentialsError(f"{source} is blank: {fix}")
    bad = _bad_char(clean)
    if bad is not None:
        pos, what = bad
        raise CredentialsError(
            f"{source} holds {what} at position {pos + 1} of the token; a token is one word of "
            f"printable ASCII characters: {fix}"
        )
    return clean


def sendable(token: Any) -> str | None:
    """``token`` stripped of surrounding whitespace when it can be sent in a header, else None
    (for a stored token the CLI only tries, such as the one ``login`` replaces)."""
    clean = str(token).strip() if token else ""
    return clean if clean and _bad_char(clean) is None else None


def token_for(server: str) -> str | None:
    """The token to send to ``server``: ``RENDERFARM_TOKEN`` if set, else the stored one, else None.

    Surrounding whitespace (such as a trailing newline) is removed.

    Raises:
        CredentialsError: the file cannot be read (and no ``RENDERFARM_TOKEN`` is set), or
            the token in use is blank or holds a space, control or non-ASCII character
            (see :func:`checked_token`; the message names ``RENDERFARM_TOKEN`` or the file).
    """
    env = os.environ.get(ENV_TOKEN)
    if env:
        return checked_token(env, ENV_TOKEN, f"set {ENV_TOKEN} to the token alone (or unset it)")
    entry = stored(server)
    if not entry:
        return None
    url = server_key(server)
    return checked_token(
        str(entry["token"]),
        f"the token stored for {url} in {credentials_path()}",
        f"run `renderfarm login --server {url}` to replace it",
    )

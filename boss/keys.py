"""Worker SSH keys on the boss machine: the restricted authorized_keys line and its file.

A worker logs in to the boss machine's sshd with its own key, and that key may
do exactly one thing: open a ``direct-tcpip`` channel to the boss's RPC server
on ``127.0.0.1:PORT``. :func:`authorized_keys_line` writes the restriction that
was verified against OpenSSH 9.2 (FACTS.md, SSH)::

    restrict,port-forwarding,permitopen="127.0.0.1:PORT",permitlisten="127.0.0.1:1",
    command="/bin/false" ssh-ed25519 AAAA... ecloud-worker

``restrict`` turns everything off (pty, agent, X11, forwarding, rc files),
``port-forwarding`` turns forwarding back on, ``permitopen`` limits local
forwards to the literal ``127.0.0.1:PORT``, ``permitlisten`` limits remote
forwards to port 1, which only root may bind, and the forced ``command``
replaces any shell, exec or subsystem (sftp) with ``/bin/false``.

If the boss's SSH user is root, sshd *does* grant the remote forward on
127.0.0.1:1 (verified). :func:`sshd_config_match_block` gives the sshd_config
lines that refuse every remote forward for the worker user; use them whenever
the boss machine's sshd_config can be changed.

Errors: an invalid public key raises :class:`PublicKeyError` (a ``ValueError``
and a ``UserError``); file problems raise ``UserError`` naming the file.
This module is pure standard library plus ``cryptography``: no SQLAlchemy.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from boss.errors import UserError

KEY_TYPES = frozenset({
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
})
DEFAULT_COMMENT = "ecloud-worker"
_ED25519_BLOB_LEN = 4 + len("ssh-ed25519") + 4 + 32
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class PublicKeyError(UserError, ValueError):
    """A public key line is not ``TYPE BASE64 [comment]`` for a key type sshd accepts."""


@dataclass(frozen=True)
class PublicKey:
    """One OpenSSH public key: ``type``, base64 ``data`` and an optional ``comment``."""

    type: str
    data: str
    comment: str = ""

    def __str__(self) -> str:
        return f"{self.type} {self.data}" + (f" {self.comment}" if self.comment else "")


def parse_public_key(text: str) -> PublicKey:
    """Parse and check one public key line (a ``.pub`` file's content).

    The key data must be valid base64 whose embedded type matches the line's.
    Raise PublicKeyError saying what is wrong and what to pass instead.
    """
    line = text.strip()
    shown = line if len(line) <= 60 else line[:57] + "..."
    if "\n" in line or "\r" in line:
        raise PublicKeyError("a public key must be one line (the content of a .pub file); "
                             "got several lines")
    fields = line.split(None, 2)
    if len(fields) < 2:
        raise PublicKeyError(f"public key {shown!r} is not 'TYPE BASE64 [comment]': pass the "
                             "content of the worker's .pub file")
    key_type, data = fields[0], fields[1]
    comment = fields[2] if len(fields) == 3 else ""
    if key_type not in KEY_TYPES:
        hint = ("it looks like an authorized_keys line with options; pass the bare public key"
                if any(c in key_type for c in ',="') else
                f"expected one of {', '.join(sorted(KEY_TYPES))}")
        raise PublicKeyError(f"public key {shown!r}: unknown key type {key_type!r}: {hint}")
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise PublicKeyError(f"public key {shown!r}: the key data is not valid base64; was "
                             "the line cut or wrapped when copied?") from None
    if len(blob) < 4:
        raise PublicKeyError(f"public key {shown!r}: the key data is truncated")
    (name_len,) = struct.unpack(">I", blob[:4])
    embedded = blob[4 : 4 + name_len].decode("ascii", errors="replace")
    if embedded != key_type:
        raise PublicKeyError(f"public key {shown!r}: the key data is a {embedded!r} key but "
                             f"the line says {key_type!r}")
    if key_type == "ssh-ed25519" and len(blob) != _ED25519_BLOB_LEN:
        raise PublicKeyError(f"public key {shown!r}: an ed25519 key is {_ED25519_BLOB_LEN} "
                             f"bytes, this one is {len(blob)}; was the line cut?")
    if _CONTROL.search(comment):
        raise PublicKeyError(f"public key {shown!r}: the comment has control characters")
    return PublicKey(key_type, data, comment)


def authorized_keys_line(public_key: str, port: int, comment: str = DEFAULT_COMMENT) -> str:
    """The authorized_keys line that lets ``public_key`` only tunnel to ``127.0.0.1:port``.

    ``public_key`` is a ``.pub`` line (its own comment is replaced by
    ``comment``); ``port`` is the boss's RPC port.
    """
    key = parse_public_key(public_key)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port {port!r} must be the boss's RPC port, 1-65535")
    if _CONTROL.search(comment):
        raise ValueError(f"comment {comment!r} must not contain control characters")
    options = (f'restrict,port-forwarding,permitopen="127.0.0.1:{port}",'
               'permitlisten="127.0.0.1:1",command="/bin/false"')
    return f"{options} {PublicKey(key.type, key.data, comment.strip())}"


def sshd_config_match_block(user: str) -> str:
    """sshd_config lines refusing every remote forward and tty for the worker login ``user``.

    Needed when that user is root (root may bind 127.0.0.1:1, which the
    authorized_keys line permits); harmless otherwise. Append it at the end of
    sshd_config (a Match block runs to the end of the file or the next Match).
    """
    if not re.fullmatch(r"[A-Za-z0-9._][A-Za-z0-9._-]*", user):
        raise ValueError(f"user {user!r} is not a plain login name")
    return (f"Match User {user}\n"
            "    AllowTcpForwarding local\n"
            "    PermitListen none\n"
            "    PermitTTY no\n"
            "    X11Forwarding no\n"
            "    AllowAgentForwarding no\n")


def key_of_line(line: str) -> PublicKey | None:
    """The key in an authorized_keys line, after any options; None for comments and junk."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    first = text.split(None, 1)[0]
    if first not in KEY_TYPES:
        # skip the options field: it ends at the first blank outside double quotes
        quoted, i = False, 0
        while i < len(text) and (quoted or not text[i].isspace()):
            if text[i] == "\\" and quoted:
                i += 1  # an escaped character inside quotes, e.g. \"
            elif text[i] == '"':
                quoted = not quoted
            i += 1
        text = text[i:]
    try:
        return parse_public_key(text)
    except PublicKeyError:
        return None


def install_authorized_key(path: str | Path, line: str) -> bool:
    """Put ``line`` in the authorized_keys file ``path``, replacing any line with the same key.

    Idempotent; other lines and comments are kept in order. A missing file is
    created 0600 (and a missing directory 0700); the file is replaced
    atomically. Return True if the file changed. The boss is assumed to be the
    only program editing the file at that moment.
    """
    key = key_of_line(line)
    if key is None or "\n" in line.strip():
        raise PublicKeyError(f"{line[:60]!r} is not one authorized_keys line with a public key")
    return _rewrite(Path(path).expanduser(), key, line.strip())


def remove_authorized_key(path: str | Path, public_key: str) -> bool:
    """Remove every line for ``public_key`` from ``path``; return True if any was there."""
    key = parse_public_key(public_key)
    target = Path(path).expanduser()
    if not target.exists():
        return False
    return _rewrite(target, key, None)


def _rewrite(path: Path, key: PublicKey, line: str | None) -> bool:
    # write through a symlink rather than replacing it with a regular file
    target = path.resolve() if path.is_symlink() else path
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        old = target.read_text() if target.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the authorized_keys file {target}: {exc}") from exc
    kept: list[str] = []
    placed = line is None
    for existing in old.splitlines():
        found = key_of_line(existing)
        if found is not None and (found.type, found.data) == (key.type, key.data):
            if not placed and line is not None:
                kept.append(line)  # the new line takes the old one's place
                placed = True
            continue  # and duplicates of the same key go
        kept.append(existing)
    if not placed and line is not None:
        kept.append(line)
    new = "".join(f"{k}\n" for k in kept)
    if new == old:
        return False
    _write_atomically(target, new)
    return True


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # sshd reads the file at every login: it must never see half of it
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the authorized_keys file {path}: {exc}") from exc


def generate_worker_keypair(directory: str | Path, name: str = "ecloud_worker_ed25519",
                            comment: str = DEFAULT_COMMENT) -> tuple[Path, str]:
    """Create an unencrypted ed25519 key pair ``NAME`` / ``NAME.pub`` in ``directory``.

    Return (private key path, public key line). The private key is written 0600
    in OpenSSH format (readable by ssh and paramiko); the directory is created
    0700 if missing. An existing key is never overwritten.
    """
    if _CONTROL.search(comment) or "/" in name or not name:
        raise ValueError(f"bad key name {name!r} or comment {comment!r}")
    folder = Path(directory).expanduser()
    private_path, public_path = folder / name, folder / f"{name}.pub"
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    public_line = f"{public} {comment}".strip()
    written: list[Path] = []
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path, data, mode in ((private_path, private, 0o600),
                                 (public_path, f"{public_line}\n".encode(), 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except OSError as exc:
        # no half pair left behind: a lone private key would block the next attempt
        for path in written:
            path.unlink(missing_ok=True)
        if not isinstance(exc, FileExistsError):
            raise UserError(f"cannot write the worker key pair in {folder}: {exc}") from exc
        raise UserError(f"{exc.filename} already exists; remove it or choose another key "
                        "name (an existing key is never overwritten)") from exc
    return private_path, public_line

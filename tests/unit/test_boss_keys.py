"""boss.keys: the restricted authorized_keys line, key validation, the file, key generation."""

from __future__ import annotations

import base64
import stat
import struct
from pathlib import Path

import paramiko
import pytest

from boss.errors import UserError
from boss.keys import (
    PublicKeyError,
    authorized_keys_line,
    generate_worker_keypair,
    install_authorized_key,
    key_of_line,
    parse_public_key,
    remove_authorized_key,
    sshd_config_match_block,
)

# a real ed25519 public key (ssh-keygen), fixed so the expected lines are literal
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILmCYUOgSw0W86jbFfCcuEhCU83A73wVN6hvXw1+qkZW"
OTHER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPsk36T+EFiOtTYZoNpkm1KbrAm4eZDI0lSQU0EVibWr"


def test_line_is_exactly_the_verified_restriction() -> None:
    assert authorized_keys_line(f"{KEY} me@laptop", 7878) == (
        'restrict,port-forwarding,permitopen="127.0.0.1:7878",permitlisten="127.0.0.1:1",'
        f'command="/bin/false" {KEY} ecloud-worker')


def test_line_takes_a_comment_and_tolerates_surrounding_blanks() -> None:
    line = authorized_keys_line(f"  {KEY}\n", 1, comment="worker-7")
    assert line.endswith(f'permitopen="127.0.0.1:1",permitlisten="127.0.0.1:1",'
                         f'command="/bin/false" {KEY} worker-7')
    assert authorized_keys_line(KEY, 65535, comment="").endswith(KEY)


@pytest.mark.parametrize("port", [0, -1, 65536, True, "7878", 78.0])
def test_line_refuses_a_bad_port(port: object) -> None:
    with pytest.raises(ValueError, match="must be the boss's RPC port"):
        authorized_keys_line(KEY, port)  # type: ignore[arg-type]


def _blob(name: bytes, payload: bytes) -> str:
    return base64.b64encode(struct.pack(">I", len(name)) + name + payload).decode()


@pytest.mark.parametrize(("text", "why"), [
    ("", "is not 'TYPE BASE64"),
    ("ssh-ed25519", "is not 'TYPE BASE64"),
    ("ssh-dss AAAAB3NzaC1kc3M=", "unknown key type 'ssh-dss'"),
    (f'restrict,command="/bin/false" {KEY}', "authorized_keys line with options"),
    ("ssh-ed25519 not*base64", "not valid base64"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILmCYUOgSw0W86jbFfCcuEhCU83A73wVN6hvXw1+qk",
     "not valid base64"),  # cut off mid-group
    (f"ssh-rsa {KEY.split()[1]}", "is a 'ssh-ed25519' key but the line says 'ssh-rsa'"),
    (f"ssh-ed25519 {_blob(b'ssh-ed25519', b'x' * 31)}", "an ed25519 key is 51 bytes"),
    (f"{KEY}\n{OTHER}", "must be one line"),
    (f"{KEY} bad\x07comment", "control characters"),
])
def test_bad_public_keys_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(PublicKeyError, match=why.replace("(", r"\(")) as err:
        authorized_keys_line(text, 7878)
    # usable both as a ValueError and as a user-facing ecloud error
    assert isinstance(err.value, ValueError) and isinstance(err.value, UserError)


def test_parse_public_key_keeps_the_comment() -> None:
    key = parse_public_key(f"{KEY} alice@host with spaces")
    assert (key.type, key.comment) == ("ssh-ed25519", "alice@host with spaces")
    assert str(key) == f"{KEY} alice@host with spaces"


@pytest.mark.parametrize("line", [
    KEY,
    f"{KEY} comment",
    f'restrict,command="/bin/false" {KEY} c',
    f'command="echo \\"a b\\"",from="10.0.0.1" {KEY}',
    f'environment="X=a b" {KEY}',
])
def test_key_of_line_finds_the_key_after_any_options(line: str) -> None:
    found = key_of_line(line)
    assert found is not None and f"{found.type} {found.data}" == KEY


@pytest.mark.parametrize("line", ["", "   ", "# a comment", "garbage", 'opts="x y" notakey'])
def test_key_of_line_ignores_comments_and_junk(line: str) -> None:
    assert key_of_line(line) is None


def test_install_creates_the_file_and_directory_private(tmp_path: Path) -> None:
    path = tmp_path / "home" / ".ssh" / "authorized_keys"
    line = authorized_keys_line(KEY, 7878)
    assert install_authorized_key(path, line) is True
    assert path.read_text() == line + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_install_is_idempotent_and_replaces_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    path.write_text(f"# keep me\n{OTHER} admin\n{KEY} old-unrestricted\n\n{KEY} duplicate\n")
    line = authorized_keys_line(KEY, 7878)
    assert install_authorized_key(path, line) is True
    assert path.read_text() == f"# keep me\n{OTHER} admin\n{line}\n\n"
    assert install_authorized_key(path, line) is False  # nothing to do the second time
    newer = authorized_keys_line(KEY, 9000)
    assert install_authorized_key(path, newer) is True
    assert path.read_text() == f"# keep me\n{OTHER} admin\n{newer}\n\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_install_refuses_a_line_without_a_key(tmp_path: Path) -> None:
    with pytest.raises(PublicKeyError, match="not one authorized_keys line"):
        install_authorized_key(tmp_path / "authorized_keys", "restrict junk")
    assert not (tmp_path / "authorized_keys").exists()


def test_install_names_the_file_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(UserError, match=str(blocker)):
        install_authorized_key(blocker / "authorized_keys", authorized_keys_line(KEY, 1))


def test_remove_drops_every_line_of_the_key(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    path.write_text(f"{KEY} a\n{OTHER} b\n{authorized_keys_line(KEY, 1)}\n")
    assert remove_authorized_key(path, KEY) is True
    assert path.read_text() == f"{OTHER} b\n"
    assert remove_authorized_key(path, KEY) is False
    assert remove_authorized_key(tmp_path / "missing", KEY) is False


def test_generated_key_pair_is_usable_and_private(tmp_path: Path) -> None:
    private, public = generate_worker_keypair(tmp_path / "keys", comment="w1")
    assert parse_public_key(public).comment == "w1"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    assert private.with_name(private.name + ".pub").read_text() == public + "\n"
    loaded = paramiko.PKey.from_path(private)  # what the worker will do
    assert f"{loaded.get_name()} {loaded.get_base64()}" == " ".join(public.split()[:2])


def test_generate_never_overwrites_a_key(tmp_path: Path) -> None:
    private, _ = generate_worker_keypair(tmp_path)
    before = private.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        generate_worker_keypair(tmp_path)
    assert private.read_bytes() == before
    # a stray .pub alone blocks too, and leaves no half pair behind
    (tmp_path / "other.pub").write_text("x")
    with pytest.raises(UserError, match=r"other\.pub already exists"):
        generate_worker_keypair(tmp_path, name="other")
    assert not (tmp_path / "other").exists()


def test_sshd_config_block_names_the_user_and_closes_remote_forwards() -> None:
    block = sshd_config_match_block("ecloud")
    assert block.startswith("Match User ecloud\n")
    assert "    AllowTcpForwarding local\n" in block and "    PermitListen none\n" in block
    with pytest.raises(ValueError, match="not a plain login name"):
        sshd_config_match_block("ecloud\nPermitRootLogin yes")

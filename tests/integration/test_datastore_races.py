"""Two workers staging out into the same new directory at the same moment.

fsspec's SFTP ``makedirs`` looks (``exists``) and then makes (``mkdir``) each
level, so a worker that loses the race between the two gets the SFTP server's
bare "Failure" for a directory that is now there. The interleaving is forced
here: the other worker's directory appears, for real, between the two steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from protocol.document import parse_remote
from tests import sshd as sshd_helper
from tests.integration.test_datastore import no_guard, sftp_url
from worker import datastore
from worker.datastore import Datastore

sshd = sshd_helper.sshd  # the fixture; assigned, not imported, so ruff sees no F811

pytestmark = pytest.mark.sshd


@pytest.mark.parametrize("depth", [1, 3], ids=["top", "parent"])
def test_a_directory_made_meanwhile_by_another_worker_is_no_error(
        sshd: sshd_helper.Sshd, tmp_path: Path, depth: int) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    local = tmp_path / "part.txt"
    local.write_bytes(b"part\n")
    parts = ["out", "sums", "deep"][:depth]
    raced = root.joinpath(*parts)  # the level the other worker makes first
    url = sftp_url(sshd, root)
    with Datastore({"data": url}, url) as store:
        fs, final = store.resolve(parse_remote("data:out/sums/deep/part.txt"))
        real_exists = fs.exists
        lost: list[str] = []

        def exists_then_lose_the_race(path: str, **kw: Any) -> bool:
            found = bool(real_exists(path, **kw))
            if not found and path.rstrip("/").endswith("/".join(parts)) and not lost:
                raced.mkdir(parents=True)  # the other worker, between exists and mkdir
                lost.append(path)
            return found

        fs.exists = exists_then_lose_the_race
        temp = final + ".ecloud-part-1"
        assert datastore.upload(fs, local, temp, guard=no_guard) == 5
        datastore.publish(fs, temp, final)
    assert lost, "the race was not forced"
    assert (root / "out/sums/deep/part.txt").read_bytes() == b"part\n"

"""Run-time path escapes on the host (no container), beyond tests/integration/test_attempt.py.

Push-time refusals of absolute and ``..`` paths are in tests/acceptance/test_bad_input.py
and tests/unit/test_document.py; output links, links in output directories and a
stdout redirect through a link are in test_attempt.py. Here: reading through a
planted link (stdin), and the controls that links staying inside the work
directory still work, so the guard is not simply refusing every link. The
container case (a link planted between two commands turning a mount into a
host file) is in test_container_mounts.py.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_attempt import Harness, tree
from tests.integration.test_attempt import h as h  # the fixture

SECRET = "host-secret-91be"


def secret_file(h: Harness) -> Path:
    path = h.tmp / "secret"
    path.write_text(SECRET + "\n")
    return path


def test_stdin_through_a_planted_link_is_refused(h: Harness) -> None:
    doc = {"outputs": {"data:copy": "copy"},
           "commands": [{"command": ["ln", "-s", str(secret_file(h)), "link"]},
                        {"command": ["cat"], "stdin": "link", "stdout": "copy"}]}
    result = h.run(doc)
    assert result.outcome == "failed"
    assert "outside the work directory" in result.reason, result.reason
    assert SECRET not in result.stdout_tail + result.stderr_tail
    assert tree(h.data) == {}
    assert not any(SECRET in p.read_text(errors="replace")
                   for p in h.logs.rglob("*") if p.is_file())


def test_a_redirect_under_a_planted_directory_link_is_refused(h: Harness) -> None:
    victim = h.tmp / "victims"
    victim.mkdir()
    # the worker made dir/ for the redirect before the commands ran: replace it
    doc = {"commands": [{"command": ["sh", "-c", f"rmdir dir && ln -s {victim} dir"]},
                        {"command": ["echo", "planted"], "stdout": "dir/new.txt"}]}
    result = h.run(doc)
    assert result.outcome == "failed"
    assert "outside the work directory" in result.reason, result.reason
    assert list(victim.iterdir()) == []


def test_links_that_stay_inside_the_work_dir_are_followed(h: Harness) -> None:
    """The control for the refusals: the guard refuses leaving, not linking."""
    doc = {"outputs": {"data:out/": "d/", "data:single": "one"},
           "commands": [{"command": ["sh", "-c",
                                     "mkdir -p d && echo real > real.txt && "
                                     "ln -s ../real.txt d/inner && ln -s real.txt one"]},
                        {"command": ["cat"], "stdin": "one", "stdout": "d/copy"}]}
    result = h.run(doc)
    assert result.outcome == "succeeded", result.reason
    assert (h.data / "out" / "inner").read_text() == "real\n"
    assert (h.data / "out" / "copy").read_text() == "real\n"
    assert (h.data / "single").read_text() == "real\n"
    assert not (h.data / "out" / "inner").is_symlink()  # copied as a file, not as a link

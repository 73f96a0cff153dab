"""The ``boss`` command end to end: a settings file, a SQLite database, subprocesses.

Data is on stdout (counts, ids, tables, JSON), messages on stderr; user
mistakes exit 2 with one ``error:`` line each, and no command ever prints a
traceback (checked on every run by :class:`Cli`).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from tests.acceptance.helpers import Cli, Ran, db_path, seed, snapshot, task, write_settings


def as_json(ran: Ran) -> Any:
    assert ran.code == 0, str(ran)
    return json.loads(ran.stdout)


def states(ran: Ran) -> dict[str, str]:
    return {r["name"]: r["state"] for r in as_json(ran)}


def user_error(ran: Ran, *needles: str) -> None:
    """Exit 2, nothing on stdout, and an ``error:`` message holding every needle."""
    assert ran.code == 2, str(ran)
    assert ran.stdout == "", str(ran)
    assert ran.stderr.startswith("error: "), str(ran)
    for needle in needles:
        assert needle in ran.stderr, f"{needle!r} not in\n{ran}"


def test_push_list_show_cancel_retry(cli: Cli, tmp_path: Path) -> None:
    cli.ok("init")
    assert db_path(tmp_path).is_file()

    # a JSON array: a writes data:out/a.txt, b waits on a by name
    (tmp_path / "tasks.json").write_text(json.dumps([
        task("a", outputs={"data:out/a.txt": "a.txt"}),
        task("b", after=["a"]),
        task("c", priority=5, retries=2),
    ], indent=2))
    pushed = cli.ok("push-tasks", "tasks.json")
    assert pushed.stdout.strip() == "3"
    assert "pushed 3 tasks (2 ready, 1 dependencies)" in pushed.stderr

    # JSON lines with a blank line; d waits on a because it reads a's output
    (tmp_path / "more.jsonl").write_text(
        json.dumps(task("d", inputs={"data:out/a.txt": "in.txt"})) + "\n\n"
        + json.dumps(task("e")) + "\n")
    pushed = cli.ok("push-tasks", "more.jsonl", "--json")
    assert as_json(pushed) == {"pushed": 2, "skipped": 0, "edges": 1, "ready": 1,
                               "first_id": 4}

    # standard input, spooled and read twice like a file
    pushed = cli.ok("push-tasks", "-", stdin=(json.dumps(task("f", after=["e"])) + "\n").encode())
    assert pushed.stdout.strip() == "1" and "pushed 1 tasks (0 ready" in pushed.stderr
    assert not list((tmp_path / "spool").glob("*")), "the spooled stdin copy was left behind"

    listing, waiting, page, page2, shown, detail, status = cli.run_all([
        ["tasks", "--json"],
        ["tasks", "--state", "waiting", "--json"],
        ["tasks", "--limit", "2"],
        ["tasks", "--after", "2", "--limit", "2", "--json"],
        ["show", "a", "--json"],
        ["show", "d"],
        ["admin", "status", "--json"],
    ])
    assert states(listing) == {"a": "ready", "b": "waiting", "c": "ready", "d": "waiting",
                               "e": "ready", "f": "waiting"}
    assert [r["id"] for r in as_json(listing)] == [1, 2, 3, 4, 5, 6]
    c = next(r for r in as_json(listing) if r["name"] == "c")
    assert (c["priority"], c["max_tries"], c["tries"]) == (5, 3, 0)
    assert states(waiting) == {"b": "waiting", "d": "waiting", "f": "waiting"}
    assert " a " in page.stdout and " b " in page.stdout and " c " not in page.stdout
    assert "more: boss tasks --after 2" in page.stderr
    assert [r["name"] for r in as_json(page2)] == ["c", "d"]

    a = as_json(shown)
    assert a["name"] == "a" and a["state"] == "ready" and a["attempts"] == []
    assert a["document"] == task("a", outputs={"data:out/a.txt": "a.txt"})
    assert [ch["name"] for ch in a["children"]] == ["b", "d"] and a["parents"] == []
    assert detail.code == 0 and "d (id 4): waiting" in detail.stdout
    assert "after: a (ready)" in detail.stdout and '"in.txt"' in detail.stdout

    counts = as_json(status)
    assert counts["tasks"] == {"waiting": 3, "ready": 3, "running": 0, "succeeded": 0,
                               "failed": 0, "upstream_failed": 0, "cancelled": 0}
    assert counts["workers"] == {} and str(db_path(tmp_path)) in counts["database"]

    cancelled = cli.ok("cancel", "a")
    assert cancelled.stdout == "" and "cancelled a (was ready)" in cancelled.stderr
    after_cancel, again = cli.run_all([["tasks", "--json"], ["cancel", "a"]])
    assert states(after_cancel) == {"a": "cancelled", "b": "upstream_failed", "c": "ready",
                                    "d": "upstream_failed", "e": "ready", "f": "waiting"}
    user_error(again, "'a'", "cancelled")

    retried = cli.ok("retry", "a")
    assert retried.stdout.strip() == "1" and "1 tasks back in the queue" in retried.stderr
    # the settings file can also come from ECLOUD_SETTINGS
    by_env = cli.run("tasks", "--json", settings=False,
                     env={"ECLOUD_SETTINGS": str(cli.settings)})
    assert states(by_env) == {"a": "ready", "b": "waiting", "c": "ready", "d": "waiting",
                              "e": "ready", "f": "waiting"}


def test_user_errors_exit_2_and_change_nothing(cli: Cli, tmp_path: Path) -> None:
    seed(cli, [task("only")])
    before = snapshot(db_path(tmp_path))
    (show, retry_nothing, retry_ready, bad_state, bad_bucket, bad_url, url_bucket,
     no_command) = cli.run_all([
        ["show", "nope"],
        ["retry"],
        ["retry", "only"],
        ["tasks", "--state", "bogus"],
        ["admin", "set-bucket", "default", "s3://b"],
        ["admin", "set-datastore", "http://example.com/x"],
        ["admin", "set-bucket", "bad name", "file:///tmp/x"],
        ["no-such-command"],
    ])
    user_error(show, "no task named 'nope'")
    user_error(retry_nothing, "--failed")
    user_error(retry_ready, "'only'", "ready")
    user_error(bad_state, "'bogus'", "waiting, ready")
    user_error(bad_bucket, "'default'", "set-datastore")
    user_error(bad_url, "http://example.com/x", "file:///")
    user_error(url_bucket, "'bad name'")
    # typer's own usage error
    assert no_command.code == 2 and no_command.stdout == "", str(no_command)
    assert "No such command" in no_command.stderr
    assert snapshot(db_path(tmp_path)) == before


def test_admin_context_and_workers(cli: Cli, tmp_path: Path) -> None:
    seed(cli, [])
    # a URL that looks like rich markup is data, printed as it is
    weird = "s3://bucket/[/x][bold]y"
    ds, bk, other = cli.run_all([  # three writes to different keys, in any order
        ["admin", "set-datastore", f"file://{tmp_path}/store"],
        ["admin", "set-bucket", "raw", weird],
        ["admin", "set-bucket", "other", "gs://other"],
    ])
    assert ds.code == bk.code == other.code == 0, f"{ds}\n{bk}\n{other}"
    assert ds.stdout == "" and f"datastore set to file://{tmp_path}/store" in ds.stderr
    assert f"bucket raw -> {weird}" in bk.stderr

    shown, table, status = cli.run_all([["admin", "show-context", "--json"],
                                        ["admin", "show-context"],
                                        ["admin", "status"]])
    ctx = as_json(shown)
    assert ctx["context"] == {"datastore": f"file://{tmp_path}/store",
                              "bucket.raw": weird, "bucket.other": "gs://other"}
    assert ctx["datastore"] == f"file://{tmp_path}/store"
    assert ctx["buckets"] == {"data": f"file://{tmp_path}/data", "raw": weird,
                              "other": "gs://other", "default": f"file://{tmp_path}/store"}
    assert table.code == 0 and weird in table.stdout and "bucket.other" in table.stdout
    assert status.code == 0 and weird in status.stdout and "tasks (0)" in status.stdout

    dropped = cli.ok("admin", "drop-context", "bucket.raw")
    assert "dropped 1 context keys" in dropped.stderr
    token_file = tmp_path / "keys" / "w1.token"
    shown, added = cli.run_all([
        ["admin", "show-context", "--json"],
        ["admin", "add-worker", "--token-file", str(token_file), "--name", "w1",
         "--slots", "3"],
    ])
    assert set(as_json(shown)["context"]) == {"datastore", "bucket.other"}
    assert added.code == 0, str(added)
    assert added.stdout.strip() == "1" and "worker w1 registered" in added.stderr
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token not in added.stdout + added.stderr
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    dropped = cli.ok("admin", "drop-context")
    assert "dropped 2 context keys" in dropped.stderr
    shown, workers, wtable, upgraded, zero_slots = cli.run_all([
        ["admin", "show-context", "--json"],
        ["admin", "show-workers", "--json"],
        ["admin", "show-workers"],
        ["db", "upgrade"],
        ["admin", "add-worker", "--token-file", str(tmp_path / "w2"), "--slots", "0"],
    ])
    ctx = as_json(shown)
    assert ctx["context"] == {}
    assert ctx["datastore"] == ctx["buckets"]["default"] == f"file://{tmp_path}/data"
    (w,) = as_json(workers)
    assert (w["id"], w["name"], w["provider"], w["slots"], w["tasks"]) == (
        1, "w1", "manual", 3, [])
    assert token not in workers.stdout, "the token must never be shown again"
    assert " w1 " in wtable.stdout and "manual" in wtable.stdout
    assert upgraded.code == 0 and "newest schema" in upgraded.stderr and upgraded.stdout == ""
    assert zero_slots.code == 2 and not (tmp_path / "w2").exists(), str(zero_slots)


def test_settings_found_in_the_current_directory(tmp_path: Path) -> None:
    """Without --settings or ECLOUD_SETTINGS, ./ecloud.toml is used; init comes first."""
    write_settings(tmp_path, "ecloud.toml")
    cli = Cli(tmp_path, settings=None)
    not_yet = cli.run("tasks")
    assert not_yet.code == 1 and "run `boss init`" in not_yet.stderr, str(not_yet)
    assert str(db_path(tmp_path)) in not_yet.stderr
    init = cli.ok("init")
    assert init.stdout == "" and "database ready" in init.stderr
    assert f"sqlite:///{db_path(tmp_path)}" in init.stderr


def test_instantiate_worker_dry_run_creates_nothing(cli: Cli, tmp_path: Path) -> None:
    cli.ok("init")
    before = snapshot(db_path(tmp_path))
    ran = cli.ok("instantiate-worker", "2", "--slots", "3", "--dry-run")
    plans = [json.loads(line) for line in ran.stdout.splitlines()]
    assert len(plans) == 2 and "dry run: 2 local worker(s) not created" in ran.stderr
    for plan in plans:
        argv = plan["argv"]
        assert argv[argv.index("--slots") + 1] == "3" and "--burst" in argv
    assert snapshot(db_path(tmp_path)) == before
    assert not (tmp_path / ".ecloud" / "workers").exists()

    # gce: the request bodies, without credentials or a network; no token in them
    key = tmp_path / "host.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOBn0dzAq1WPnk8RZMvh0Gm7S8a0gXhZ6F host\n")
    ran = cli.ok("instantiate-worker", "1", "--provider", "gce", "--spot", "--dry-run",
                 env={"ECLOUD_GCE_PROJECT": "proj", "ECLOUD_BOSS_SSH_HOST_KEY_FILE": str(key),
                      "NO_GCE_CHECK": "true"})
    [request] = [json.loads(line) for line in ran.stdout.splitlines()]
    assert request["method"] == "instances.insert"
    assert request["project"] == "proj" and request["zone"] == "us-central1-a"
    assert request["body"]["scheduling"]["provisioningModel"] == "SPOT"
    items = {i["key"]: i["value"] for i in request["body"]["metadata"]["items"]}
    assert items["ecloud-token"].startswith("<token")
    assert snapshot(db_path(tmp_path)) == before


def test_events_follow_prints_new_events(cli: Cli, tmp_path: Path) -> None:
    import subprocess
    import time

    cli.ok("init")
    out = tmp_path / "follow.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(cli.command(["events", "--follow", "--json"]), cwd=cli.cwd,
                                env=cli.env, stdout=sink, stderr=subprocess.DEVNULL)
    try:
        (tmp_path / "one.json").write_text(json.dumps([task("a"), task("b", after=["a"])]))
        cli.ok("push-tasks", "one.json")
        cli.ok("cancel", "a")
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while len(lines) < 3 and time.monotonic() < deadline:  # bounded in time
            time.sleep(0.2)
            lines = out.read_text().splitlines()
        kinds = [json.loads(line)["kind"] for line in lines]
        assert kinds == ["jobs.pushed", "job.cancelled", "job.upstream-failed"], lines
    finally:
        proc.terminate()
        proc.wait(timeout=30)

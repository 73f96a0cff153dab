"""No secret reaches a log, an event, `boss show`, the report or any other output.

A small real workload runs end to end: `boss serve`, then `worker run` through
the boss's real sshd with its generated restricted key and its token, tasks
that succeed, fail, time out and print their environment. Then every place a
user or an operator reads is collected (the boss's and the worker's logs,
every database row, the datastore with the uploaded task logs, and the output
of `boss show`, `events --json`, `admin status`, `admin show-workers`,
`admin show-context`, `logs`, `why`, `tasks`, `report` HTML and JSON) and
searched for the worker's token, every line of its private key's body, and a
datastore password given in the settings.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from boss import render
from boss.providers import HIDDEN_KEY
from protocol.settings import hide_password
from tests.acceptance.test_worker_e2e import BIN, TIMEOUT, Site
from tests.httpd import serving_http
from tests.sshd import Sshd, ssh_keygen
from tests.sshd import sshd as sshd  # the fixture

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(900)]

TASKS: list[dict[str, Any]] = [
    {"name": "fine", "outputs": {"data:out/fine.txt": "fine.txt"},
     "commands": [{"command": ["sh", "-c", "echo hello > fine.txt; env; echo done"]}]},
    {"name": "env", "commands": [{"command": ["sh", "-c", "env; env >&2; ls -la ~ /proc/self"]}]},
    {"name": "boom", "commands": [{"command": ["sh", "-c", "env >&2; exit 3"]}]},
    {"name": "slow", "timeout": 0.5, "commands": [{"command": ["sleep", "30"]}]},
    {"name": "after-boom", "after": ["boom"], "commands": [{"command": ["true"]}]},
]


PASSWORD = "Vault-Passw0rd-4f9c2e"
VAULT = f"sftp://ecloud:{PASSWORD}@127.0.0.1:9/nowhere"


def secret_needles(token: str, key_path: Path) -> dict[str, str]:
    """What must appear nowhere: the token, and each base64 line of the key's body."""
    lines = [ln for ln in key_path.read_text().splitlines() if ln and not ln.startswith("-----")]
    assert len(lines) >= 3, "not an OpenSSH private key"
    needles = {"token": token, "token[:16]": token[:16], "datastore password": PASSWORD}
    needles.update({f"key line {i}": ln for i, ln in enumerate(lines) if len(ln) >= 16})
    return needles


def every_file(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield str(path), path.read_bytes()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "site"
    root.mkdir()
    s = Site(root, f"file://{tmp_path}/store")
    yield s
    s.stop()


def test_no_secret_in_any_output(site: Site, sshd: Sshd, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    # a bucket no task uses, whose URL holds a password: shown anywhere, it leaks
    settings = site.root / "ecloud.toml"
    settings.write_text(settings.read_text().replace(
        "[datastore.buckets]\n", f'[datastore.buckets]\nvault = "{VAULT}"\n'))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    site.run("boss", "init")
    site.run("boss", "push-tasks", str(tmp_path / "t.jsonl"))
    site.run("boss", "admin", "add-worker", "--token-file", "tok", "--slots", "2",
             "--name", "w1")
    site.run("boss", "admin", "authorize-worker-key", "--generate", "keys", "--install",
             "--authorized-keys", str(sshd.authorized_keys_path))
    token = (site.root / "tok").read_text().strip()
    key = site.root / "keys" / "ecloud_worker_ed25519"
    needles = secret_needles(token, key)
    for secret in (site.root / "tok", key):  # readable by their owner only
        assert secret.stat().st_mode & 0o077 == 0, (secret, oct(secret.stat().st_mode))
    site.serve()
    boss_url = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}?port={site.port}"
    worker = subprocess.run(
        [str(BIN / "worker"), "run", "-v", "--boss", boss_url, "--token-file", "tok",
         "--burst", "--key", str(key), "--known-hosts", str(sshd.known_hosts_path),
         "--slots", "2"],
        cwd=site.root, env=site.env, capture_output=True, text=True, timeout=TIMEOUT)
    assert worker.returncode == 0, worker.stderr
    assert json.loads(worker.stdout)["ran"] >= 4, worker.stdout
    site.stop()  # flushes the serve log

    outputs: dict[str, str] = {"worker stdout": worker.stdout, "worker stderr": worker.stderr}
    commands: list[tuple[str, ...]] = [
        ("tasks", "--json"), ("events", "--json"), ("admin", "status"),
        ("admin", "status", "--json"), ("admin", "show-workers", "--all", "--json"),
        ("admin", "show-context"), ("admin", "show-context", "--json"),
        ("report", str(tmp_path / "report.html")),
        ("report", str(tmp_path / "report2.html"), "--json")]
    commands += [("show", str(t["name"]), "--json") for t in TASKS]
    commands += [("show", "slow"), ("show", "boom"), ("why", "after-boom"), ("logs", "env"),
                 ("logs", "env", "--stderr"), ("logs", "boom", "--stderr"), ("logs", "fine")]
    # side by side: each is an interpreter start on a loaded 2-core machine
    with ThreadPoolExecutor(4) as pool:
        ran = list(pool.map(lambda args: site.run("boss", *args, check=False), commands))
    for args, done in zip(commands, ran, strict=True):
        assert "Traceback" not in done.stderr, (args, done.stderr)
        outputs["boss " + " ".join(args)] = done.stdout + done.stderr
    assert "HOME=" in outputs["boss logs env"]  # the control: task output is in there
    # every row of every table, events included, read with the stdlib
    con = sqlite3.connect(site.root / ".ecloud" / "boss.db") if (
        site.root / ".ecloud" / "boss.db").exists() else None
    if con is None:
        found = list(site.root.rglob("*.db"))
        assert found, "no SQLite database under the site"
        con = sqlite3.connect(found[0])
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            rows = con.execute(f'SELECT * FROM "{table}"').fetchall()
            outputs[f"table {table}"] = repr(rows)
    finally:
        con.close()
    assert "job.execution.finished" in outputs["table events"]  # the control
    files = {**dict(every_file(store)), str(tmp_path / "report.html"):
             (tmp_path / "report.html").read_bytes(),
             "serve.log": (site.root / "serve.log").read_bytes()}
    for path, data in every_file(site.root / "work"):
        files[path] = data
    for name, data in files.items():
        outputs[name] = data.decode(errors="replace")

    leaks = [(what, where) for where, text in outputs.items()
             for what, needle in needles.items() if needle in text]
    assert leaks == [], leaks
    print(f"\n{len(needles)} secrets searched for in {len(outputs)} outputs "
          f"({sum(len(t) for t in outputs.values())} characters): none found")


@pytest.mark.parametrize(("url", "shown"), [
    (VAULT, "sftp://ecloud:***@127.0.0.1:9/nowhere"),
    ("s3://b/p?key=AKIA&secret=abc&region=x", "s3://b/p?key=AKIA&secret=***&region=x"),
    ("gs://b/p?token=/etc/creds.json", "gs://b/p?token=***"),
    ("sftp://u@h/p?key_filename=/k", "sftp://u@h/p?key_filename=/k"),
    ("s3://bucket/[/x][bold]y", "s3://bucket/[/x][bold]y"),
    ("file:///srv/a:b@c", "file:///srv/a:b@c"),
])
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert hide_password(url) == shown


def test_show_renders_attempt_states_without_a_style() -> None:
    """`boss show` of a task whose attempt timed out crashed (rich MarkupError on "[]")."""
    console = Console(file=io.StringIO(), width=200)
    attempt = {"id": 1, "number": 1, "worker_id": 1, "started_at": 0.0, "metrics": {},
               "exit_status": None, "reason": "timed out"}
    render.task_detail(console, {
        "name": "slow", "id": 1, "state": "failed", "priority": 0, "tries": 2,
        "max_tries": 2, "lost": 0, "reason": "", "parents": [], "children": [],
        "document": {}, "attempts": [{**attempt, "state": s} for s in ("timeout", "lost")]})
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "timeout" in text and "lost" in text


def test_gce_dry_run_does_not_print_the_workers_private_key(tmp_path: Path) -> None:
    """`instantiate-worker --dry-run` prints the instance requests; the workers' key,
    which goes in their metadata, is shown as a placeholder, the rest as sent."""
    ssh_keygen(tmp_path / "worker_key", "worker")
    ssh_keygen(tmp_path / "host_key", "host")
    (tmp_path / "ecloud.toml").write_text(
        f'[boss]\nworker_key_file = "{tmp_path}/worker_key"\n'
        f'ssh_host_key_file = "{tmp_path}/host_key.pub"\nssh_host = "boss.example"\n'
        '[gce]\nproject = "proj"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
    env["NO_GCE_CHECK"] = "true"  # never probe a metadata server
    done = subprocess.run([str(BIN / "boss"), "instantiate-worker", "2", "--provider", "gce",
                           "--dry-run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    requests = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(requests) == 2
    items = {i["key"]: i["value"] for i in requests[0]["body"]["metadata"]["items"]}
    assert items["ecloud-worker-key"] == HIDDEN_KEY  # the control: it would be here
    assert "boss.example" in items["ecloud-boss-host-key"]
    needles = secret_needles("-", tmp_path / "worker_key")
    leaks = [what for what, needle in needles.items()
             if what.startswith("key") and needle in done.stdout + done.stderr]
    assert leaks == [], leaks


# ---- the gce provider, against the fake Compute Engine of tests/gce_server.py -------------

KEY_TEXT = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAAWORKERKEYBODYLINE1\n"
            "AAAAC3NzaC1lZDI1NTE5AAAAWORKERKEYBODYLINE2\n-----END OPENSSH PRIVATE KEY-----\n")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from tests import gce_server
    from tests.integration import test_gce

    monkeypatch.setenv("NO_GCE_CHECK", "true")  # never probe a metadata server
    with gce_server.serve() as f:
        try:
            yield f
        finally:
            while test_gce._OPEN:
                test_gce._OPEN.pop().close()


def test_gce_workers_tokens_and_key_stay_out_of_rows_and_logs(
        fake: Any, boss: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Quota refusals and a retried 503 on the way: the tokens and the workers' key go
    to Compute Engine (the control) and nowhere else: not the worker rows, not the
    events, not the errors, not the log."""
    from tests.integration.test_gce import make_provider

    caplog.set_level("DEBUG")
    fake.quota, fake.fail_first = 2, 1
    provider = make_provider(fake, worker_key=KEY_TEXT)
    results = boss.instantiate(4, provider, slots=2)
    assert len(results) == 4 and sum(1 for r in results if hasattr(r, "reference")) == 2
    sent = json.dumps([c.body for c in fake.calls])
    tokens = [i["value"] for body in fake.bodies() + fake.bodies("/setMetadata")
              for i in (body.get("metadata", body) or {}).get("items", [])
              if i["key"] == "ecloud-token"]
    assert tokens and all(t in sent for t in tokens)  # the control: they were sent
    assert "WORKERKEYBODYLINE1" in sent
    from tests.security.test_tokens import snapshot

    seen = json.dumps(snapshot(boss), default=str) + caplog.text + repr(results)
    seen += json.dumps(boss.events(), default=str) + json.dumps(boss.status(), default=str)
    leaks = [t for t in tokens if t in seen]
    leaks += [k for k in ("WORKERKEYBODYLINE1", "WORKERKEYBODYLINE2") if k in seen]
    assert leaks == [], leaks
    print(f"\n{len(tokens)} tokens and the workers' key sent to the fake Compute Engine; "
          f"none in {len(seen)} characters of rows, events, errors and logs")


def test_gce_service_account_key_stays_out_of_errors(fake: Any, boss: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A service-account credential (fake, made here) whose token exchange fails: the
    error says so, without the key or its id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    from tests.integration.test_gce import make_provider

    caplog.set_level("DEBUG")
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    key_id = "f00dfeed" * 5
    exchanges: list[bytes] = []

    class TokenEndpoint(BaseHTTPRequestHandler):
        """What oauth2.googleapis.com answers a key it does not know."""

        def do_POST(self) -> None:
            exchanges.append(self.rfile.read(int(self.headers["Content-Length"])))
            body = b'{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}'
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serving_http(TokenEndpoint) as endpoint:
        creds = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            {"type": "service_account", "project_id": "proj", "private_key_id": key_id,
             "private_key": pem, "client_email": "ecloud@proj.iam.gserviceaccount.com",
             "client_id": "1234567890",
             "token_uri": f"http://127.0.0.1:{endpoint.server_address[1]}/token"},
            scopes=["https://www.googleapis.com/auth/cloud-platform"])
        provider = make_provider(fake, credentials=creds)
        results = boss.instantiate(2, provider, slots=1)
    assert exchanges  # the control: the credential was used
    errors = [str(getattr(r, "error", "")) for r in results]
    assert all(errors), results  # the control: the token exchange did fail
    seen = "\n".join(errors) + caplog.text + json.dumps(boss.events(), default=str)
    seen += json.dumps(boss.workers(include_terminated=True), default=str)
    body_lines = [ln for ln in pem.splitlines() if not ln.startswith("-----")]
    leaks = [ln for ln in body_lines if ln in seen] + ([key_id] if key_id in seen else [])
    assert leaks == [], leaks
    print(f"\nservice-account token exchange refused: {errors[0][:100]!r}; no key in it")


def test_database_password_is_not_printed(tmp_path: Path) -> None:
    """A PostgreSQL URL with a password, unreachable: every command's error names the
    database without the password."""
    password = "DbPassw0rd-77e1"
    (tmp_path / "ecloud.toml").write_text(
        f'[boss]\ndatabase_url = "postgresql+psycopg://ecloud:{password}@127.0.0.1:1/ecloud"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
    commands = [["admin", "status"], ["tasks"], ["init"], ["events", "--json"]]

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "boss"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(run, commands))
    for args, done in zip(commands, runs, strict=True):
        assert done.returncode != 0, args
        assert "ecloud:***@127.0.0.1:1" in done.stderr, (args, done.stderr)  # the control
        assert password not in done.stdout + done.stderr, (args, done.stderr)

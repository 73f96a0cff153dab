"""The worker VM's start-up script (boss/startup.py).

The text is checked (bash -n, pinned version, quoting, the TOML it writes),
then the script really runs under bash: against a tiny metadata server on
127.0.0.1, with ``ECLOUD_ROOT`` pointing at a temporary directory, either
stopping after /etc (``ECLOUD_STARTUP_DRY_RUN=1``) or going on to the install
and the restart loop with fake ``python3``, ``apt-get``, ``pip`` and ``worker``.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from boss.startup import RESTARTS, toml_string, worker_script, worker_tuning
from protocol.settings import Settings, load_settings
from tests.httpd import serving_http

VERSION = "0.1.0"
HOST_KEY = "[10.0.0.2]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyOfTheBoss"
PRIVATE_KEY = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAAwhatever\n"
               "-----END OPENSSH PRIVATE KEY-----")  # no final newline: the script adds it
TOKEN = "tok-3f9a0c-secret"
BOSS = "ssh://ecloud@10.0.0.2:22?port=7878"
HOSTILE = ["it's", 'a "quote"', "back\\slash", "$(touch pwned)", "`touch pwned`", "${HOME}",
           "semi;colon && touch pwned", "new\nline", "tab\there", "ünï", "# not a comment"]


def attributes() -> dict[str, str]:
    return {"ecloud-token": TOKEN, "ecloud-boss": BOSS, "ecloud-boss-host-key": HOST_KEY,
            "ecloud-worker-key": PRIVATE_KEY, "ecloud-slots": "4"}


# ---------------------------------------------------------------- metadata server

@dataclass
class Metadata:
    url: str
    attrs: dict[str, str] = field(default_factory=attributes)
    unavailable: int = 0  # answer 503 to this many requests first
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (path, flavor header)


@pytest.fixture
def metadata() -> Iterator[Metadata]:
    """A fake GCE metadata server: attributes by name, the Metadata-Flavor header required."""
    state = Metadata(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            flavor = self.headers.get("Metadata-Flavor")
            state.seen.append((self.path, flavor))
            name = self.path.rsplit("/", 1)[-1]
            if state.unavailable > 0:
                state.unavailable -= 1
                self._answer(503, "starting")
            elif flavor != "Google":
                self._answer(403, "Missing Metadata-Flavor:Google header.")
            elif name in state.attrs:
                self._answer(200, state.attrs[name])
            else:
                self._answer(404, "not found")

        def _answer(self, code: int, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving_http(Handler) as server:
        state.url = (f"http://127.0.0.1:{server.server_address[1]}"
                     "/computeMetadata/v1/instance/attributes")
        yield state


def settings(**worker: object) -> Settings:
    return Settings.model_validate({"worker": worker})


def run_script(script: str | Path, tmp_path: Path, *, dry_run: bool = True,
               path_first: Path | None = None, trace: bool = False,
               **env: str) -> subprocess.CompletedProcess[str]:
    """Run the script (text, or a file) under bash with its root in tmp_path/root."""
    if isinstance(script, Path):
        file = script
    else:
        file = tmp_path / "startup.sh"
        file.write_text(script)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    path = os.environ["PATH"] if path_first is None else f"{path_first}:{os.environ['PATH']}"
    full = {"PATH": path, "HOME": str(tmp_path), "ECLOUD_ROOT": str(tmp_path / "root"),
            "ECLOUD_METADATA_TRIES": "3", "ECLOUD_METADATA_DELAY": "0", **env}
    if dry_run:
        full["ECLOUD_STARTUP_DRY_RUN"] = "1"
    return subprocess.run(["bash", *(["-x"] if trace else []), str(file)], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=30, check=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- the text

@pytest.mark.parametrize("s", [Settings(), settings(container_args=HOSTILE, slots=7)],
                         ids=["defaults", "hostile-settings"])
@pytest.mark.parametrize("version", [VERSION, "1.0'; touch pwned; echo '"],
                         ids=["plain", "hostile"])
def test_script_is_valid_bash(s: Settings, version: str) -> None:
    script = worker_script(s, version, metadata_url="http://x/$(touch pwned)'\"")
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True,
                          timeout=10, check=False)
    assert proc.returncode == 0, proc.stderr
    assert script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script


def test_version_is_pinned_with_the_extras_the_datastore_needs() -> None:
    assert "ecloud==0.1.0" in worker_script(Settings(), VERSION)
    gs = Settings.model_validate({"datastore": {"default": "gs://bucket/ecloud",
                                                "buckets": {"x": "s3://b/p"}}})
    assert "'ecloud[gs,s3]==0.1.0'" in worker_script(gs, VERSION)
    assert '"${ECLOUD_PIP_SPEC:-$default_pip_spec}"' in worker_script(Settings(), VERSION)
    with pytest.raises(ValueError, match="version"):
        worker_script(Settings(), " ")


def _assignments(script: str) -> dict[str, str]:
    """The name=VALUE lines the script starts with, read back as the shell would."""
    head = script.split("\nroot=", 1)[0]
    words = shlex.split(head, comments=True)
    return dict(w.split("=", 1) for w in words if re.match(r"[a-z_]+=", w))


def test_the_heredoc_is_toml_once_substituted() -> None:
    s = settings(container_args=HOSTILE, cache_bytes=123, heartbeat_seconds=2.5,
                 container_runtime="docker")
    script = worker_script(s, VERSION)
    (heredoc,) = re.findall(r"<<ECLOUD_TOML\n(.*?)\nECLOUD_TOML\n", script, flags=re.DOTALL)
    values = _assignments(script)
    assert values["tuning"] == worker_tuning(s), "shell quoting round-trips the tuning"

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name.endswith("_t"):
            return toml_string(f"/etc/ecloud/{name} \"q\" \\ $x")
        return {"slots": "3", "tuning": values["tuning"]}[name]

    doc = tomllib.loads(re.sub(r"\$\{(\w+)\}", sub, heredoc))
    w = doc["worker"]
    assert w["container_args"] == HOSTILE
    assert (w["cache_bytes"], w["heartbeat_seconds"], w["container_runtime"]) == (
        123, 2.5, "docker")
    assert w["boss"] == '/etc/ecloud/boss_t "q" \\ $x'
    assert w["slots"] == 3


@pytest.mark.parametrize("value", ["", "plain", *HOSTILE, "\x00\x1f\x7f", "\U0001F600"],
                         ids=lambda v: repr(v)[:20])
def test_toml_string_round_trips(value: str) -> None:
    assert tomllib.loads(f"v = {toml_string(value)}")["v"] == value


# ---------------------------------------------------------------- dry runs

def test_dry_run_writes_the_worker_configuration(metadata: Metadata, tmp_path: Path) -> None:
    proc = run_script(worker_script(settings(slots=3), VERSION, metadata_url=metadata.url),
                      tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    etc = tmp_path / "root/etc/ecloud"
    assert (etc / "token").read_text() == TOKEN
    assert (etc / "worker_key").read_text() == PRIVATE_KEY + "\n"
    assert (etc / "known_hosts").read_text() == HOST_KEY + "\n"
    for name in ("token", "worker_key", "known_hosts"):
        assert mode(etc / name) == 0o600, name
    assert sorted(p.name for p in etc.iterdir()) == [
        "ecloud.toml", "known_hosts", "startup.sh", "token", "worker_key"
    ], "no temporary files left"
    assert (etc / "startup.sh").read_text() == (tmp_path / "startup.sh").read_text()
    assert mode(etc / "startup.sh") == 0o700, "kept for `sudo bash -x` re-runs"

    # The worker itself accepts the file (extra keys or bad types would be refused).
    loaded = load_settings(str(etc / "ecloud.toml"), environ={}).worker
    assert loaded.boss == BOSS
    assert loaded.slots == 4, "ecloud-slots wins over the boss's [worker] slots"
    assert loaded.token_file == str(etc / "token")
    assert loaded.ssh_key == str(etc / "worker_key")
    assert loaded.known_hosts == str(etc / "known_hosts")
    assert loaded.workdir == str(tmp_path / "root/var/lib/ecloud/work")
    assert loaded.cache_dir == str(tmp_path / "root/var/cache/ecloud")
    assert loaded.heartbeat_seconds == Settings().worker.heartbeat_seconds

    unit = (tmp_path / "root/etc/systemd/system/ecloud-worker.service").read_text()
    exec_start = (f"ExecStart={tmp_path}/root/opt/ecloud/venv/bin/worker --settings "
                  f"{etc}/ecloud.toml run --burst")
    for line in (exec_start, "Restart=on-failure", "RestartSec=5", f"StartLimitBurst={RESTARTS}",
                 "StartLimitIntervalSec=600", "WantedBy=multi-user.target"):
        assert line in unit.splitlines()

    assert {flavor for _, flavor in metadata.seen} == {"Google"}
    assert {p.rsplit("/", 1)[1] for p, _ in metadata.seen} == set(attributes())
    log = (tmp_path / "root/var/log/ecloud-worker-startup.log").read_text()
    assert "dry run" in log and "ecloud 0.1.0" in log and BOSS in log
    assert TOKEN not in log and "b3BlbnNzaC1rZXk" not in log, "secrets are never logged"
    assert not (tmp_path / "root/opt").exists(), "a dry run installs nothing"


def test_a_traced_run_shows_no_secret(metadata: Metadata, tmp_path: Path) -> None:
    proc = run_script(worker_script(Settings(), VERSION, metadata_url=metadata.url), tmp_path,
                      trace=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "+ fetch ecloud-token" in proc.stdout, "the trace goes to the log too"
    assert TOKEN not in proc.stdout + proc.stderr
    assert "b3BlbnNzaC1rZXk" not in proc.stdout + proc.stderr


def test_slots_default_to_the_boss_settings(metadata: Metadata, tmp_path: Path) -> None:
    del metadata.attrs["ecloud-slots"]
    proc = run_script(worker_script(settings(slots=3), VERSION, metadata_url=metadata.url),
                      tmp_path)
    assert proc.returncode == 0, proc.stdout
    written = tmp_path / "root/etc/ecloud/ecloud.toml"
    assert load_settings(str(written), environ={}).worker.slots == 3


def test_a_second_boot_overwrites_in_place(metadata: Metadata, tmp_path: Path) -> None:
    script = worker_script(Settings(), VERSION, metadata_url=metadata.url)
    assert run_script(script, tmp_path).returncode == 0
    metadata.attrs["ecloud-token"] = "rotated"
    kept = tmp_path / "root/etc/ecloud/startup.sh"
    proc = run_script(kept, tmp_path)  # as `sudo bash -x /etc/ecloud/startup.sh` would
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert kept.read_text() == script
    assert (tmp_path / "root/etc/ecloud/token").read_text() == "rotated"
    log = (tmp_path / "root/var/log/ecloud-worker-startup.log").read_text()
    assert log.count("dry run") == 2, "the log is appended to"


def test_hostile_values_stay_data(metadata: Metadata, tmp_path: Path) -> None:
    boss = "ssh://e@h:22?port=7878&x=\"$(touch${IFS}pwned)`touch${IFS}pwned`\\';#"
    metadata.attrs["ecloud-boss"] = boss
    version = "1.0'$(touch pwned)\"`touch pwned`"
    url = metadata.url + "/x'$(touch${IFS}pwned)`touch${IFS}pwned`;{[x"  # no "#": a fragment
    s = settings(container_args=HOSTILE)
    proc = run_script(worker_script(s, version, metadata_url=url), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("pwned")), "nothing was executed"
    doc = tomllib.loads((tmp_path / "root/etc/ecloud/ecloud.toml").read_text())
    assert doc["worker"]["boss"] == boss
    assert doc["worker"]["container_args"] == HOSTILE
    assert f"ecloud {version};" in proc.stdout


@pytest.mark.parametrize(("change", "message"), [
    ({"ecloud-worker-key": None}, "instance attribute ecloud-worker-key is not set"),
    ({"ecloud-token": None}, "instance attribute ecloud-token is not set"),
    ({"ecloud-token": ""}, "ecloud-token is empty"),
    ({"ecloud-boss": "http://10.0.0.2"}, "ecloud-boss is not ssh://"),
    ({"ecloud-boss": "ssh://a b@host"}, "ecloud-boss is not ssh://"),
    ({"ecloud-slots": "0"}, "ecloud-slots is '0'"),
    ({"ecloud-slots": "2000"}, "ecloud-slots is '2000'"),
    ({"ecloud-slots": "four"}, "ecloud-slots is 'four'"),
], ids=["no-key", "no-token", "empty-token", "http-boss", "space-boss", "zero-slots",
        "many-slots", "word-slots"])
def test_bad_metadata_is_named(metadata: Metadata, tmp_path: Path,
                               change: dict[str, str | None], message: str) -> None:
    for name, value in change.items():
        if value is None:
            del metadata.attrs[name]
        else:
            metadata.attrs[name] = value
    proc = run_script(worker_script(Settings(), VERSION, metadata_url=metadata.url), tmp_path)
    assert proc.returncode != 0
    assert message in proc.stdout
    assert not (tmp_path / "root/etc/ecloud/ecloud.toml").exists()


def test_waits_for_the_metadata_server(metadata: Metadata, tmp_path: Path) -> None:
    metadata.unavailable = 2
    proc = run_script(worker_script(Settings(), VERSION, metadata_url=metadata.url), tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "HTTP 503 (try 2 of 3)" in proc.stdout


def test_gives_up_on_a_dead_metadata_server(tmp_path: Path) -> None:
    dead = "http://127.0.0.1:9/computeMetadata/v1/instance/attributes"  # discard: refused
    proc = run_script(worker_script(Settings(), VERSION, metadata_url=dead), tmp_path)
    assert proc.returncode == 1
    assert "no answer from the metadata server" in proc.stdout
    assert "after 3 tries" in proc.stdout


def test_a_root_with_odd_characters_is_refused(tmp_path: Path) -> None:
    proc = run_script(worker_script(Settings(), VERSION), tmp_path,
                      ECLOUD_ROOT=str(tmp_path / "a b"))
    assert proc.returncode == 2
    assert "only letters, digits" in proc.stderr


# ---------------------------------------------------------------- install and run (faked)

FAKE_PYTHON = """#!/usr/bin/env bash
# fake python3: ensurepip present unless $FAKE_NO_ENSUREPIP; -m venv makes fake pip/worker
log="$FAKE_LOG"
if [[ "$1" == -c ]]; then [[ -z "${FAKE_NO_ENSUREPIP:-}" ]]; exit; fi
[[ "$1 $2" == "-m venv" ]] || exit 99
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\\necho "pip $*" >> %q\\n' "$log" > "$3/bin/pip"
printf '#!/usr/bin/env bash\\necho "python $*" >> %q\\n' "$log" > "$3/bin/python"
cat > "$3/bin/worker" <<EOF
#!/usr/bin/env bash
echo "worker \\$*" >> $(printf %q "$log")
n=\\$(grep -c '^worker ' $(printf %q "$log"))
(( n > \\${FAKE_WORKER_FAILS:-0} ))
EOF
chmod +x "$3/bin/"*
"""


@pytest.fixture
def fakes(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "apt-get").write_text('#!/usr/bin/env bash\necho "apt-get $*" >> "$FAKE_LOG"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls").read_text().splitlines()


@pytest.mark.parametrize("ensurepip", [True, False], ids=["venv-ready", "apt-installs-venv"])
def test_installs_and_runs_in_a_restart_loop_without_systemd(
        metadata: Metadata, tmp_path: Path, fakes: Path, ensurepip: bool) -> None:
    script = worker_script(Settings(), VERSION, metadata_url=metadata.url)
    extra = {} if ensurepip else {"FAKE_NO_ENSUREPIP": "1"}
    proc = run_script(script, tmp_path, dry_run=False, path_first=fakes,
                      FAKE_LOG=str(tmp_path / "calls"), FAKE_WORKER_FAILS="2",
                      ECLOUD_NO_SYSTEMD="1", ECLOUD_RESTART_DELAY="0", **extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = _calls(tmp_path)
    apt = [c for c in calls if c.startswith("apt-get")]
    if ensurepip:
        assert apt == []
    else:
        assert apt[-1].endswith("install -y -q python3-venv")
    assert [c for c in calls if c.startswith("pip")] == [
        "pip install --disable-pip-version-check --no-input --retries 10 --timeout 30 "
        "-q ecloud==0.1.0"]
    settings_file = tmp_path / "root/etc/ecloud/ecloud.toml"
    assert [c for c in calls if c.startswith("worker")] == [
        f"worker --settings {settings_file} run --burst"] * 3, "failed twice, then finished"
    assert "exited with status 1 (run 2 of 6)" in proc.stdout
    assert "the worker finished" in proc.stdout


def test_the_restart_loop_is_bounded(metadata: Metadata, tmp_path: Path, fakes: Path) -> None:
    script = worker_script(Settings(), VERSION, metadata_url=metadata.url)
    proc = run_script(script, tmp_path, dry_run=False, path_first=fakes,
                      FAKE_LOG=str(tmp_path / "calls"), FAKE_WORKER_FAILS="1000",
                      ECLOUD_NO_SYSTEMD="1", ECLOUD_RESTART_DELAY="0",
                      ECLOUD_PIP_SPEC="/wheels/ecloud-0.1.0-py3-none-any.whl")
    assert proc.returncode == 1
    calls = _calls(tmp_path)
    assert sum(c.startswith("worker") for c in calls) == RESTARTS + 1
    assert calls[0].endswith("-q /wheels/ecloud-0.1.0-py3-none-any.whl"), "ECLOUD_PIP_SPEC wins"
    assert f"the worker failed {RESTARTS + 1} times" in proc.stdout

r'''The start-up script a fresh worker VM runs on boot (ecloud's startup script).

:func:`worker_script` returns a bash script, pure text built from the
settings and the ecloud version, that a provider puts in an instance's
``startup-script`` metadata. On every boot it:

1. logs everything it does to ``/var/log/ecloud-worker-startup.log``;
2. reads the instance attributes from the metadata server, retrying while the
   network comes up (ecloud's ancestor slept a fixed time and hoped):
   ``ecloud-token``, ``ecloud-boss`` (``ssh://USER@HOST[:PORT]?port=PORT``),
   ``ecloud-boss-host-key`` (a known_hosts line pinning the boss),
   ``ecloud-worker-key`` (the worker's SSH private key) and, optionally,
   ``ecloud-slots``. Secrets go from curl straight into 0600 files under
   ``/etc/ecloud/``; they never sit in a shell variable, so a traced re-run
   (``bash -x``) does not print them;
3. writes ``/etc/ecloud/ecloud.toml`` (the ``[worker]`` table: boss, token_file,
   ssh_key, known_hosts, slots, workdir, cache_dir and the boss's worker
   tuning) and the systemd unit ``ecloud-worker.service``;
4. installs ``python3-venv`` and ``openssh-client`` (the worker's tunnel is
   ``ssh -W``) when missing, makes ``/opt/ecloud/venv`` and
   ``pip install``\ s ``ecloud==VERSION`` (the boss's own version, pinned);
5. starts ``worker --settings /etc/ecloud/ecloud.toml run --burst`` under
   systemd (restarted on failure, within a start limit) or, without systemd,
   in a bounded restart loop.

A worker that does not come up: on the VM, ``less /var/log/ecloud-worker-startup.log``
shows each step; ``scripts/debug.sh /etc/ecloud/ecloud.toml`` re-runs the worker
start traced; ``sudo bash -x /etc/ecloud/startup.sh`` re-runs this script traced
(it keeps a copy of itself there).

Environment knobs (for tests, images without systemd, unreleased builds):

    ECLOUD_ROOT=DIR             prefix for every path the script writes
    ECLOUD_STARTUP_DRY_RUN=1    stop after writing /etc/ecloud and the unit
    ECLOUD_PIP_SPEC=SPEC        what to pip install instead (e.g. a wheel path)
    ECLOUD_NO_SYSTEMD=1         use the restart loop even where systemd runs
    ECLOUD_METADATA_TRIES=N     metadata attempts (default 60) ...
    ECLOUD_METADATA_DELAY=S     ... this many seconds apart (default 2)
    ECLOUD_RESTART_DELAY=S      seconds between restarts in the loop (default 5)
'''

from __future__ import annotations

import shlex

from protocol.settings import Settings

METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"
LOG_FILE = "/var/log/ecloud-worker-startup.log"
RESTARTS = 5  # the worker is restarted at most this many times (systemd: per interval)
START_LIMIT_SECONDS = 600


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string: quotes, backslashes and control characters escaped."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def worker_tuning(settings: Settings) -> str:
    """The boss's ``[worker]`` tuning that a cloud worker inherits, as TOML lines."""
    w = settings.worker
    args = ", ".join(toml_string(a) for a in w.container_args)
    return "\n".join([
        f"cache_bytes = {w.cache_bytes}",
        f"heartbeat_seconds = {float(w.heartbeat_seconds)!r}",
        f"poll_seconds = {float(w.poll_seconds)!r}",
        f"give_up_seconds = {float(w.give_up_seconds)!r}",
        f"log_tail_bytes = {w.log_tail_bytes}",
        f"container_runtime = {toml_string(w.container_runtime)}",
        f"container_args = [{args}]",
    ])


def pip_spec(settings: Settings, version: str) -> str:
    """``ecloud[extras]==VERSION``: the extras the datastore URLs need (gs, s3)."""
    urls = [settings.datastore.default, *settings.datastore.buckets.values()]
    extras = sorted({scheme for scheme in ("gs", "s3")
                     if any(u.startswith(f"{scheme}://") for u in urls)})
    return f"ecloud[{','.join(extras)}]=={version}" if extras else f"ecloud=={version}"


def worker_script(settings: Settings, version: str, *, metadata_url: str = METADATA_URL) -> str:
    """The bash start-up script of a worker VM running ecloud ``version``.

    Every value from Python is shell-quoted into one assignment at the top; the
    body is constant text that only expands those variables.
    """
    if not version.strip():
        raise ValueError("worker_script needs the ecloud version to pin (e.g. '0.1.0')")
    values = {
        "version": version,
        "default_pip_spec": pip_spec(settings, version),
        "metadata_url": metadata_url.rstrip("/"),
        "default_slots": str(settings.worker.slots),
        "tuning": worker_tuning(settings),
        "restarts": str(RESTARTS),
        "start_limit_seconds": str(START_LIMIT_SECONDS),
    }
    head = "\n".join(f"{name}={shlex.quote(value)}" for name, value in values.items())
    return _PREAMBLE + head + "\n" + _BODY


_PREAMBLE = """\
#!/usr/bin/env bash
# ecloud worker start-up, generated by the boss (boss/startup.py). Runs on every boot.
# Log: /var/log/ecloud-worker-startup.log. Re-run traced: sudo bash -x /etc/ecloud/startup.sh
# Worker start traced: scripts/debug.sh /etc/ecloud/ecloud.toml
set -euo pipefail

"""

_BODY = r"""
root="${ECLOUD_ROOT:-}"
root="${root%/}"
# The root prefix goes into paths of a systemd unit and a TOML file: keep it plain.
if [[ ! "$root" =~ ^[A-Za-z0-9_./-]*$ ]]; then
  echo "ecloud start-up: ECLOUD_ROOT=$root: only letters, digits and _ . / - please" >&2
  exit 2
fi
log_file="$root/var/log/ecloud-worker-startup.log"
mkdir -p "$(dirname "$log_file")"
exec > >(tee -a "$log_file") 2>&1

etc="$root/etc/ecloud"
unit_file="$root/etc/systemd/system/ecloud-worker.service"
venv="$root/opt/ecloud/venv"
workdir="$root/var/lib/ecloud/work"
cache_dir="$root/var/cache/ecloud"
settings_file="$etc/ecloud.toml"
spec="${ECLOUD_PIP_SPEC:-$default_pip_spec}"
tries="${ECLOUD_METADATA_TRIES:-60}"
delay="${ECLOUD_METADATA_DELAY:-2}"
restart_delay="${ECLOUD_RESTART_DELAY:-5}"

say() { echo "ecloud start-up $(date -u +%Y-%m-%dT%H:%M:%SZ): $*"; }
die() { say "FAILED: $*"; exit 1; }

[[ "$tries" =~ ^[1-9][0-9]{0,3}$ ]] || die "ECLOUD_METADATA_TRIES=$tries: a number 1-9999"
[[ "$delay" =~ ^[0-9]{1,3}$ ]] || die "ECLOUD_METADATA_DELAY=$delay: seconds, 0-999"
[[ "$restart_delay" =~ ^[0-9]{1,3}$ ]] || die "ECLOUD_RESTART_DELAY=$restart_delay: 0-999"
say "ecloud $version; pip spec $spec; metadata $metadata_url; root ${root:-/}"

# fetch NAME FILE: the instance attribute NAME into FILE (0600). Retried while the
# network and the metadata server come up; returns 1 when the attribute is not set.
fetch() {
  local name=$1 dest=$2 code try part
  # Called as `fetch ... || die`, where set -e is off: check each step by hand.
  part="$(mktemp "$dest.XXXXXX")" || die "cannot write in $(dirname "$dest")"  # 0600
  for (( try = 1; try <= tries; try++ )); do
    code="$(curl -sS --globoff -o "$part" -w '%{http_code}' --connect-timeout 5 --max-time 30 \
            -H 'Metadata-Flavor: Google' "$metadata_url/$name")" || code=000
    case "$code" in
      200) mv -f "$part" "$dest" || die "cannot write $dest"; return 0 ;;
      404) rm -f "$part"; return 1 ;;
    esac
    say "metadata $name: HTTP $code (try $try of $tries)"
    if (( try < tries )); then sleep "$delay"; fi
  done
  rm -f "$part"
  die "no answer from the metadata server ($metadata_url) for $name after $tries tries"
}

# ends_with_newline FILE: add the final newline a PEM key or a known_hosts line needs.
ends_with_newline() {
  if [[ -s "$1" && -n "$(tail -c 1 "$1")" ]]; then
    echo >> "$1"
  fi
}

# toml_str VALUE: VALUE as a TOML basic string (the caller refused control characters).
toml_str() {
  printf '"%s"' "$(printf '%s' "$1" | sed 's/[\\"]/\\&/g')"
}

install -d -m 0755 "$etc"
# Keep this script where `sudo bash -x /etc/ecloud/startup.sh` re-runs it traced.
src="${BASH_SOURCE[0]:-}"
if [[ -f "$src" && ! "$src" -ef "$etc/startup.sh" ]]; then
  install -m 0700 "$src" "$etc/startup.sh"
fi
required=(token:ecloud-token boss:ecloud-boss known_hosts:ecloud-boss-host-key
          worker_key:ecloud-worker-key)
for pair in "${required[@]}"; do
  file="${pair%%:*}" name="${pair#*:}"
  fetch "$name" "$etc/$file" \
    || die "instance attribute $name is not set (the provider writes it; see boss/providers)"
done
ends_with_newline "$etc/known_hosts"
ends_with_newline "$etc/worker_key"
[[ -s "$etc/token" ]] || die "instance attribute ecloud-token is empty"

# printable_url VALUE: ssh:// or tcp:// and printable ASCII, no spaces (it goes into a
# TOML string and a log line); LC_ALL=C so that the range means bytes in any locale.
printable_url() { local LC_ALL=C; [[ "$1" =~ ^(ssh|tcp)://[!-~]+$ ]]; }

boss="$(cat "$etc/boss")"
rm -f "$etc/boss"
if ! printable_url "$boss"; then
  die "instance attribute ecloud-boss is not ssh://USER@HOST[:PORT]?port=PORT or tcp://..."
fi
if fetch ecloud-slots "$etc/slots"; then
  slots="$(cat "$etc/slots")"
  rm -f "$etc/slots"
else
  slots="$default_slots"
fi
if [[ ! "$slots" =~ ^[0-9]{1,4}$ ]] || (( 10#$slots < 1 || 10#$slots > 1024 )); then
  die "instance attribute ecloud-slots is '$slots': a number of slots, 1-1024"
fi
slots=$(( 10#$slots ))
say "boss $boss; $slots slots"

boss_t="$(toml_str "$boss")"
token_t="$(toml_str "$etc/token")"
key_t="$(toml_str "$etc/worker_key")"
known_t="$(toml_str "$etc/known_hosts")"
workdir_t="$(toml_str "$workdir")"
cache_t="$(toml_str "$cache_dir")"
part="$(mktemp "$settings_file.XXXXXX")"
cat > "$part" <<ECLOUD_TOML
# Written by the ecloud start-up script on each boot; edits are overwritten.
[worker]
boss = ${boss_t}
token_file = ${token_t}
ssh_key = ${key_t}
known_hosts = ${known_t}
slots = ${slots}
workdir = ${workdir_t}
cache_dir = ${cache_t}
${tuning}
ECLOUD_TOML
chmod 0644 "$part"
mv -f "$part" "$settings_file"
install -d -m 0755 "$workdir" "$cache_dir" "$(dirname "$unit_file")"

part="$(mktemp "$unit_file.XXXXXX")"
cat > "$part" <<ECLOUD_UNIT
[Unit]
Description=ecloud worker (pulls tasks from the boss)
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=${start_limit_seconds}
StartLimitBurst=${restarts}

[Service]
Type=simple
ExecStart=${venv}/bin/worker --settings ${settings_file} run --burst
Restart=on-failure
RestartSec=5
KillMode=mixed
TimeoutStopSec=120

[Install]
WantedBy=multi-user.target
ECLOUD_UNIT
chmod 0644 "$part"
mv -f "$part" "$unit_file"
say "wrote $etc and $unit_file"

if [[ "${ECLOUD_STARTUP_DRY_RUN:-}" == 1 ]]; then
  say "dry run: stopping before installing and starting the worker"
  exit 0
fi

missing=()
command -v curl > /dev/null || missing+=(curl)
command -v ssh > /dev/null || missing+=(openssh-client)  # carries the worker's tunnel
python3 -c 'import ensurepip, venv' 2> /dev/null || missing+=(python3-venv)
if (( ${#missing[@]} )); then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # At boot unattended-upgrades may hold the dpkg lock: wait for it, boundedly.
  apt-get -o DPkg::Lock::Timeout=300 update -q
  apt-get -o DPkg::Lock::Timeout=300 install -y -q "${missing[@]}"
fi
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --disable-pip-version-check --no-input --retries 10 --timeout 30 \
  -q "$spec"
[[ -x "$venv/bin/worker" ]] || die "pip installed $spec but $venv/bin/worker is missing"

if [[ "${ECLOUD_NO_SYSTEMD:-}" != 1 ]] && command -v systemctl > /dev/null \
   && [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  systemctl enable --now ecloud-worker
  say "ecloud-worker.service started (journalctl -u ecloud-worker -f)"
  exit 0
fi

say "no systemd: running the worker here, restarted at most $restarts times"
for (( run = 0; run <= restarts; run++ )); do
  status=0
  "$venv/bin/worker" --settings "$settings_file" run --burst || status=$?
  if (( status == 0 )); then
    say "the worker finished"
    exit 0
  fi
  say "the worker exited with status $status (run $((run + 1)) of $((restarts + 1)))"
  if (( run < restarts )); then sleep "$restart_delay"; fi
done
die "the worker failed $((restarts + 1)) times; see above"
"""

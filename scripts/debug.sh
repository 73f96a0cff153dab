#!/usr/bin/env bash
# ecloud's debug.sh: run a worker's start-up in the foreground, traced, to see why
# it does not come up or does not take tasks.
#
#   scripts/debug.sh [SETTINGS_FILE] [worker run options...]
#
# With `set -x` every step is shown as it runs: which settings file, which
# `worker` executable, the connection check (`worker check`: SSH connection with
# the pinned host key, the tunnel to the boss's RPC port, `hello` with the
# worker's token), then `worker run --verbose` with debug logging, exactly as a
# worker machine starts it ([worker] boss, token_file, ssh_key, known_hosts
# from the settings file). Stop it with Ctrl-C (once: finish the running tasks;
# twice: cancel them).
set -euo pipefail
set -x

settings="${1:-${ECLOUD_SETTINGS:-ecloud.toml}}"
shift || true
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
worker="${ECLOUD_WORKER_BIN:-$here/.venv/bin/worker}"
[[ -x "$worker" ]] || worker="$(command -v worker)"
[[ -f "$settings" ]] || { echo "debug.sh: settings file $settings not found" >&2; exit 2; }

"$worker" --settings "$settings" check
exec "$worker" --settings "$settings" run --verbose "$@"

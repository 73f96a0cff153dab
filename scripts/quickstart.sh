#!/usr/bin/env bash
# Try ecloud on this machine: install it, push the example pipeline, show it.
#
#   scripts/quickstart.sh [DIR]          DIR defaults to ./.ecloud-quickstart
#
# Needs nothing but Python 3.11+ (no service, no cloud account): the boss keeps
# its state in SQLite and the "data" bucket is a directory, both under
# DIR/.ecloud/ (the built-in defaults, written out in DIR/ecloud.toml).
#
# Re-runnable: the venv, DIR/ecloud.toml and the database are kept, the example
# data is copied again, and tasks that were already pushed are skipped.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-.ecloud-quickstart}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
EXAMPLE=$ROOT/examples/md5.json

say() { printf '\nquickstart: %s\n' "$*" >&2; }

# 1. Install: a venv in the repository with the boss extra.
if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV"
    if ! "$PYTHON" -m venv "$VENV"; then
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            rm -rf "$VENV"
            say "installing python3-venv (apt-get)"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                python3-venv >/dev/null
            "$PYTHON" -m venv "$VENV"
        else
            echo "quickstart: '$PYTHON -m venv' failed; on Debian: apt-get install python3-venv" >&2
            exit 1
        fi
    fi
fi
stamp=$VENV/.ecloud-installed-boss
want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" || ! -x $VENV/bin/boss ]]; then
    say "pip install -e .[boss]"
    (cd "$ROOT" && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[boss]")
    printf '%s\n' "$want" >"$stamp"
fi
boss() { "$VENV/bin/boss" "$@"; }

# 2. A scratch directory holding the settings, the database and the datastore.
cd "$DIR"
if [[ ! -f ecloud.toml ]]; then
    cp "$ROOT/settings.example.toml" ecloud.toml
fi
say "working in $DIR (settings: $DIR/ecloud.toml)"
export ECLOUD_SETTINGS=$DIR/ecloud.toml
mkdir -p .ecloud/data
cp -R "$ROOT/examples/data/." .ecloud/data/

# 3. Run it: create the database, push the example (tasks already there are
#    kept, so a re-run pushes nothing new), start local workers, show progress,
#    stop everything when the queue drains. Exit status 1 if a task failed.
say "boss run --skip-existing $EXAMPLE --workers 2"
boss run --skip-existing "$EXAMPLE" --workers 2

# 4. Where things stand.
say "boss admin status"
boss admin status
say "boss tasks"
boss tasks
say "done. Try: cd $DIR && $VENV/bin/boss show split
    results go to $DIR/.ecloud/data/md5/result/"

#!/usr/bin/env bash
# Regenerate docs/report-sample.html and docs/report-sample.png from a real run.
#
#   scripts/sample-report.sh
#
# In a scratch directory it pushes the example pipeline (examples/md5.json),
# then runs it with a few more tasks written below (sleeps of different
# lengths, a task that fails twice, one that times out) on at most 2 local
# workers of 2 slots, and writes `boss report`. Local workers cost nothing by
# default; the run sets [cost] local = 0.05 (ECLOUD_COST_LOCAL) so that the
# cost columns show figures. The screenshot needs Debian's `chromium`; without
# it only the HTML is written.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BOSS=$ROOT/.venv/bin/boss
OUT=$ROOT/docs
say() { printf 'sample-report: %s\n' "$*" >&2; }

if [[ ! -x $BOSS ]]; then
    say "no $BOSS: run scripts/quickstart.sh (or scripts/test.sh) first"
    exit 1
fi
DIR=$(mktemp -d "${TMPDIR:-/tmp}/ecloud-sample.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
cd "$DIR"
cp "$ROOT/settings.example.toml" ecloud.toml
export ECLOUD_SETTINGS=$DIR/ecloud.toml ECLOUD_COST_LOCAL=0.05
mkdir -p .ecloud/data
cp -R "$ROOT/examples/data/." .ecloud/data/

cat >extra.jsonl <<'TASKS'
{"name": "sleep-1", "commands": [{"command": ["sleep", "0.4"]}]}
{"name": "sleep-2", "commands": [{"command": ["sleep", "1.2"]}]}
{"name": "sleep-3", "commands": [{"command": ["sleep", "0.7"]}]}
{"name": "sleep-4", "commands": [{"command": ["sleep", "1.6"]}]}
{"name": "sleep-5", "commands": [{"command": ["sleep", "0.3"]}]}
{"name": "sleep-6", "commands": [{"command": ["sleep", "0.9"]}], "after": ["sleep-1"]}
{"name": "flaky", "commands": [{"command": ["echo 'reading <input>: no such file' >&2; sleep 0.5; exit 3"], "shell": true}], "retries": 1}
{"name": "too-slow", "commands": [{"command": ["sleep", "5"]}], "timeout": 1}
TASKS

"$BOSS" init 2>/dev/null
"$BOSS" push-tasks "$ROOT/examples/md5.json" >/dev/null
# `boss run` exits 1 because flaky and too-slow fail, which is what the sample shows
"$BOSS" run extra.jsonl --workers 2 --slots 2 >/dev/null || true

mkdir -p "$OUT"
"$BOSS" report "$OUT/report-sample.html" >/dev/null
if command -v chromium >/dev/null 2>&1; then
    timeout 120 chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
        --screenshot="$OUT/report-sample.png" --window-size=1400,1500 \
        "file://$OUT/report-sample.html" >/dev/null 2>&1
    say "wrote $OUT/report-sample.html and $OUT/report-sample.png"
else
    say "wrote $OUT/report-sample.html; no chromium, so no screenshot (apt-get install chromium)"
fi

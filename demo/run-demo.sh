#!/usr/bin/env bash
# End-to-end demo: Segment's raw message archive -> `tap-segment` (the PyPI tap `tap-jsonl`,
# defined inline in meltano.yml) -> target-orb -> fake-orb, a strict local Orb stand-in.
#
#   demo/run-demo.sh          (from any directory; needs Python >= 3.10 with venv, and PyPI)
#
# Steps: create or reuse .venv, install target-orb with Meltano (`pip install -e '.[demo]'`),
# `meltano install` (tap-jsonl and target-orb go into Meltano's own plugin venvs under
# .meltano/), then `meltano run tap-segment target-orb` against fake-orb, and show what
# landed, what was dead-lettered and the state Meltano stored.
#
# Env: PYTHON (interpreter that creates .venv; default python3).
# Outputs (git-ignored): output/landed.jsonl, output/target-orb-dead-letter.jsonl, .meltano/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STATE_ID=dev:tap-segment-to-target-orb

step() { printf '\n==> %s\n' "$*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  step "Creating $VENV with $PYTHON"
  if ! "$PYTHON" -m venv "$VENV"; then
    rm -rf "$VENV"
    echo "run-demo: '$PYTHON -m venv' failed; on Debian/Ubuntu install python3-venv" \
      "(apt-get install python3-venv) or set PYTHON to another Python >= 3.10." >&2
    exit 1
  fi
fi

step "Installing target-orb and Meltano into $VENV (pip install -e '.[demo]')"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[demo]'

export PATH="$PWD/$VENV/bin:$PATH"
# meltano.yml already says send_anonymous_usage_stats: false; this also covers a copy of it.
export MELTANO_SEND_ANONYMOUS_USAGE_STATS=false

step "meltano install (plugin venvs: .meltano/extractors/tap-segment, .meltano/loaders/target-orb)"
meltano install

mkdir -p output
rm -f output/landed.jsonl output/target-orb-dead-letter.jsonl
# Start every demo from no stored state, as on a first run. (tap-jsonl 0.3.1 re-reads its
# files anyway, see meltano.yml; a rerun would only send duplicates, which Orb drops.)
meltano state clear --force "$STATE_ID" >/dev/null 2>&1 || true

# The sample's timestamps are from March 2024: the stand-in gets the same widened grace
# period as target-orb's grace_period_hours in meltano.yml (Orb's real default is 12 h).
step "fake-orb --grace-period-hours 100000 -- meltano run tap-segment target-orb"
# fake-orb prints a summary of the events that landed; they are also in output/landed.jsonl.
fake-orb --grace-period-hours 100000 --events-out output/landed.jsonl --max-seconds 600 \
  -- meltano run tap-segment target-orb

step "Dead letters (output/target-orb-dead-letter.jsonl)"
if [[ -s output/target-orb-dead-letter.jsonl ]]; then
  "$VENV/bin/python" - <<'PY'
import json

with open("output/target-orb-dead-letter.jsonl", encoding="utf-8") as fh:
    for line in fh:
        entry = json.loads(line)
        record = entry["record"]
        print(f"{record.get('messageId')} ({record.get('event')!r}): {entry['reason']}"
              f" [source: {entry['source']}]")
PY
else
  echo "(none)"
fi

step "State stored by Meltano ($STATE_ID)"
meltano state get --format pretty "$STATE_ID"

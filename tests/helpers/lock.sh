#!/usr/bin/env bash
# Regenerate constraints.txt: every version that README's test install resolves to in a brand-new virtual
# environment now (torch and torchvision as README pins them, then requirements-test.txt).
#
#   tests/helpers/lock.sh                          # the newest versions requirements*.txt admit
#   tests/helpers/lock.sh transformers==5.26.0     # extra pip requirements: move one package on purpose
#
# Then run README's test command in a fresh virtual environment and commit constraints.txt with it.
set -euo pipefail

TORCH=(torch==2.14.1 torchvision==0.29.1) # README's two install commands name the same two pins
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "${TORCH[@]}" -r "$repo/requirements-test.txt" "$@"
python_version=$("$work/venv/bin/python" -c 'import platform; print(platform.python_version())')
{
    cat <<EOF
# The exact versions README's commands install and the tests were run with: both install commands
# take it as a pip constraints file, e.g.
#   pip install torch==2.14.1 torchvision==0.29.1 -r requirements-test.txt -c constraints.txt
# so a fresh machine runs what CI tested. requirements*.txt keep the supported ranges (transformers
# 5.17 to 5.x, torch 2.6 on); this file picks one tested point of them.
# Resolved in a new virtual environment (Python $python_version, $(uname -sm)) by tests/helpers/lock.sh;
# regenerate it with that script, never by hand. To move to a newer transformers: run
# tests/helpers/with_transformers.sh NEW_VERSION (the tests that exercise transformers' model code),
# then tests/helpers/lock.sh transformers==NEW_VERSION, then README's test command.
EOF
    "$work/venv/bin/python" -m pip freeze
} >"$repo/constraints.txt"
echo "wrote $repo/constraints.txt"

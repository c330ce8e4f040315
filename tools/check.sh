#!/usr/bin/env bash
# The checks CI runs before the tests (.ci/run), to run by hand too: ruff lint, ruff format and the
# import-linter layering contract (all configured in pyproject.toml). Runs every check, then fails
# if any failed, naming them. Needs the [dev] extras: pip install -e '.[dev]'
set -euo pipefail
cd "$(dirname "$0")/.."
failed=()
for check in "ruff check ." "ruff format --check ." "lint-imports --no-cache"; do
  echo "+ $check"
  $check || failed+=("$check")
done
if (( ${#failed[@]} )); then
  printf 'Failed: %s\n' "${failed[@]}" >&2
  exit 1
fi

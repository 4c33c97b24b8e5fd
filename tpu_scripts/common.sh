#!/usr/bin/env bash
# Shared by the tpu_scripts: flag parsing for the TPU VM's name, zone and project, and `run`, which
# executes a command or, under --dry-run, prints it (shell-quoted, one line) instead.
set -euo pipefail

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
DRY_RUN=0
REST=()

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# parse_common "$@": takes --name/--zone/--project/--dry-run, leaves everything else in REST.
parse_common() {
  while (($#)); do
    case "$1" in
      --name) NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  [[ -n "$NAME" ]] || die "--name is required (or set TPU_NAME)"
  [[ -n "$ZONE" ]] || die "--zone is required (or set TPU_ZONE)"
  [[ -n "$PROJECT" ]] || die "--project is required (or set TPU_PROJECT)"
}

run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# The gcloud arguments every command shares.
target() {
  printf '%s\n' "$NAME" "--zone=$ZONE" "--project=$PROJECT"
}

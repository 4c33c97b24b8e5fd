#!/usr/bin/env bash
# Create a TPU VM or pod slice.
#   tpu_scripts/create.sh --name NAME --zone ZONE --project PROJECT \
#       [--accelerator-type v4-8] [--runtime-version tpu-ubuntu2204-base] [--spot] [--dry-run]
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_common "$@"

ACCELERATOR=v4-8
RUNTIME=tpu-ubuntu2204-base
SPOT=()
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --accelerator-type) ACCELERATOR="${2:?--accelerator-type needs a value}"; shift 2 ;;
    --runtime-version) RUNTIME="${2:?--runtime-version needs a value}"; shift 2 ;;
    --spot) SPOT=(--spot); shift ;;
    *) die "unknown option $1" ;;
  esac
done

mapfile -t TARGET < <(target)
run gcloud compute tpus tpu-vm create "${TARGET[@]}" \
  "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME" "${SPOT[@]+"${SPOT[@]}"}"

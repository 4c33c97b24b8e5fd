#!/usr/bin/env bash
# Delete a TPU VM or pod slice (without asking).
#   tpu_scripts/delete.sh --name NAME --zone ZONE --project PROJECT [--dry-run]
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_common "$@"
((${#REST[@]} == 0)) || die "unknown option ${REST[0]}"

mapfile -t TARGET < <(target)
run gcloud compute tpus tpu-vm delete "${TARGET[@]}" --quiet

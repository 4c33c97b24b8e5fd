#!/usr/bin/env bash
# Run one neo-jax command on every worker at once (a pod slice runs one process per worker).
#   tpu_scripts/run.sh --name NAME --zone ZONE --project PROJECT [--dry-run] -- generate --model ... [...]
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

ARGS=()
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == "--" ]]; then
    ARGS=("${@:i+1}")
    set -- "${@:1:i-1}"
    break
  fi
done
parse_common "$@"
((${#REST[@]} == 0)) || die "unknown option ${REST[0]} (put the neo-jax arguments after --)"
((${#ARGS[@]})) || die "nothing to run: put the neo-jax arguments after --, e.g. -- generate --model ..."

mapfile -t TARGET < <(target)
# NEO_JAX_DISTRIBUTED=1: each worker's process joins the others (neo_jax.distributed.initialize).
COMMAND="cd \"\$HOME/neo_jax\" && NEO_JAX_DISTRIBUTED=1 neo-jax$(printf ' %q' "${ARGS[@]}")"
run gcloud compute tpus tpu-vm ssh "${TARGET[@]}" --worker=all "--command=$COMMAND"

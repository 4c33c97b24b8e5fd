#!/usr/bin/env bash
# Install neo_jax with the `tpu` extra on every worker of a TPU VM or pod slice.
#   tpu_scripts/setup.sh --name NAME --zone ZONE --project PROJECT [--source DIR] [--dry-run]
# The committed tree of --source (default: this checkout) is archived with git, copied to every worker,
# unpacked to ~/neo_jax and installed there.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_common "$@"

SOURCE="$(cd "$(dirname "$0")/.." && pwd)"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --source) SOURCE="${2:?--source needs a value}"; shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done
[[ -f "$SOURCE/setup.cfg" ]] || die "$SOURCE is not a neo_jax checkout (no setup.cfg)"
ARCHIVE="${TMPDIR:-/tmp}/neo_jax-$$.tar.gz"

mapfile -t TARGET < <(target)
run git -C "$SOURCE" archive --format=tar.gz --prefix=neo_jax/ -o "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:neo_jax.tar.gz" "--zone=$ZONE" "--project=$PROJECT" --worker=all
# shellcheck disable=SC2016  # $HOME is expanded on the workers, not here
run gcloud compute tpus tpu-vm ssh "${TARGET[@]}" --worker=all --command='rm -rf "$HOME/neo_jax" && tar -xzf "$HOME/neo_jax.tar.gz" -C "$HOME" && python3 -m pip install --upgrade pip && python3 -m pip install -e "$HOME/neo_jax[tpu]"'
run rm -f "$ARCHIVE"

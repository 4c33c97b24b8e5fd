#!/usr/bin/env bash
# Mount a Cloud Storage bucket with gcsfuse on every worker of a TPU VM or pod slice, so that a prepared data
# directory (neo-jax data prepare) in it is read in place: each host reads only the rows of its own chips.
#   tpu_scripts/mount.sh --name NAME --zone ZONE --project PROJECT --bucket BUCKET
#                        [--mount-point DIR] [--only-dir PREFIX] [--read-write] [--unmount] [--dry-run]
# --mount-point defaults to /mnt/BUCKET; the mount is read-only unless --read-write (training outputs that
# several hosts write may live in a bucket too). Mounting twice is harmless; --unmount undoes it.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_common "$@"

BUCKET=""
MOUNT=""
ONLY_DIR=""
MODE="-o ro"
UNMOUNT=0
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --bucket) BUCKET="${2:?--bucket needs a value}"; shift 2 ;;
    --mount-point) MOUNT="${2:?--mount-point needs a value}"; shift 2 ;;
    --only-dir) ONLY_DIR="${2:?--only-dir needs a value}"; shift 2 ;;
    --read-write) MODE=""; shift ;;
    --unmount) UNMOUNT=1; shift ;;
    *) die "unknown option $1" ;;
  esac
done
BUCKET="${BUCKET#gs://}"
BUCKET="${BUCKET%/}"
[[ -n "$BUCKET" ]] || die "--bucket is required (the bucket's name, e.g. my-corpus or gs://my-corpus)"
[[ "$BUCKET" =~ ^[a-z0-9][a-z0-9._-]*$ ]] || die "--bucket $BUCKET is not a bucket name (lowercase letters, digits, . _ -)"
MOUNT="${MOUNT:-/mnt/$BUCKET}"
[[ "$MOUNT" == /* ]] || die "--mount-point must be an absolute path, got $MOUNT"

if ((UNMOUNT)); then
  REMOTE="if mountpoint -q $(printf '%q' "$MOUNT"); then sudo fusermount -u $(printf '%q' "$MOUNT"); fi"
else
  OPTIONS="--implicit-dirs $MODE"
  [[ -z "$ONLY_DIR" ]] || OPTIONS+=" --only-dir $(printf '%q' "$ONLY_DIR")"
  REMOTE="command -v gcsfuse >/dev/null || { echo 'gcsfuse is not installed on this worker: see cloud.google.com/storage/docs/cloud-storage-fuse/install' >&2; exit 2; }"
  REMOTE+=" && sudo mkdir -p $(printf '%q' "$MOUNT") && sudo chown \"\$USER\" $(printf '%q' "$MOUNT")"
  REMOTE+=" && { mountpoint -q $(printf '%q' "$MOUNT") || gcsfuse $OPTIONS $(printf '%q' "$BUCKET") $(printf '%q' "$MOUNT"); }"
fi
mapfile -t TARGET < <(target)
run gcloud compute tpus tpu-vm ssh "${TARGET[@]}" --worker=all "--command=$REMOTE"

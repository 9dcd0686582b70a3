#!/usr/bin/env bash
# breadcrumbs-jax on a Cloud TPU slice (several hosts, one process per host, jax.distributed):
# create, install, stage, merge, teardown. Run `tpu_pod.sh --help`; every command takes --dry-run.
set -euo pipefail
MODE=pod
SCRIPT_DIR=${BASH_SOURCE[0]%/*}
[[ $SCRIPT_DIR == "${BASH_SOURCE[0]}" ]] && SCRIPT_DIR=.
# shellcheck source=tpu_scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"
main "$@"

#!/usr/bin/env bash
# breadcrumbs-jax on one Cloud TPU VM (a single host): create, install, stage, merge, fetch, teardown.
# Run `tpu_vm.sh --help`; every command takes --dry-run to print what it would run.
set -euo pipefail
MODE=vm
SCRIPT_DIR=${BASH_SOURCE[0]%/*}
[[ $SCRIPT_DIR == "${BASH_SOURCE[0]}" ]] && SCRIPT_DIR=.
# shellcheck source=tpu_scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"
main "$@"

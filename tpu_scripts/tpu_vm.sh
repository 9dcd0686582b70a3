#!/usr/bin/env bash
# breadcrumbs-jax on one Cloud TPU VM (a single host): create, install, stage, merge, fetch, teardown.
# Run `tpu_vm.sh --help`; every command takes --dry-run to print what it would run.
set -euo pipefail
MODE=vm
# shellcheck source=tpu_scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
main "$@"

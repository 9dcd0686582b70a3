#!/usr/bin/env bash
# breadcrumbs-jax on a Cloud TPU slice (several hosts, one process per host, jax.distributed):
# create, install, stage, merge, teardown. Run `tpu_pod.sh --help`; every command takes --dry-run.
set -euo pipefail
MODE=pod
# shellcheck source=tpu_scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
main "$@"

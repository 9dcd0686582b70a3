# shellcheck shell=bash
# Shared by tpu_vm.sh and tpu_pod.sh (they set MODE=vm or MODE=pod, then source this file and
# call main "$@"). Every command is printed before it runs; --dry-run prints without running.

PROG=${0##*/}
VENV=breadcrumbs-venv   # on the workers, in the home folder (remote commands start there)
JAX_VERSION=0.10.2
REPO=$(cd "$SCRIPT_DIR/.." && pwd)   # SCRIPT_DIR: this folder, set by the calling script

die() { echo "$PROG: error: $*" >&2; exit 2; }
note() { echo "# $*"; }

quote() {  # one word, quoted for a POSIX shell only where needed (as Python's shlex.quote)
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

line() {  # the words as one shell command line
  local out='' w
  for w in "$@"; do out+="${out:+ }$(quote "$w")"; done
  printf '%s' "$out"
}

run() {  # print the command line; run it unless --dry-run
  echo "+ $(line "$@")"
  if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

usage() {
  local workers='its one worker' what='VM (one host)'
  [[ $MODE == pod ]] && workers='all workers of the slice (one process each, jax.distributed)' what='slice (several hosts)'
  cat <<USAGE
Usage: $PROG COMMAND --name NAME --zone ZONE [--project PROJECT] [--dry-run] [options]

Runs breadcrumbs-jax on a Cloud TPU $what.

Commands:
  create    --accelerator-type TYPE [--version RUNTIME] [--spot]
            create the TPU (TYPE: $( [[ $MODE == vm ]] && echo 'one host, e.g. v5litepod-8, v4-8, v6e-8' || echo 'several hosts, e.g. v4-32, v5litepod-16, v6e-32'))
  install   build this checkout's wheel, copy it to the workers, install it with jax[tpu]==$JAX_VERSION
            and gcsfs (gs:// output) into ~/$VENV on each worker (and python3.11 if missing)
  stage     --from gs://BUCKET/PREFIX --to DIR
            copy the input checkpoints onto each worker's disk (every process reads its own shards
            from its local copy; DIR must be the paths the merge config names)
  merge     --config FILE --out OUT [--mesh SHAPE] [--mesh-axes NAMES] [--shard PATTERN=SPEC]... [-- ARGS]
            copy the YAML config to the workers and run 'breadcrumbs-jax merge' on $workers;
            OUT is an Orbax checkpoint: $( [[ $MODE == vm ]] && echo 'a folder on the VM, or gs://...' || echo 'gs://BUCKET/PATH (every host writes its own shards there)')
$( [[ $MODE == vm ]] && echo '  fetch     --out OUT --to LOCAL_DIR
            copy the merged checkpoint (a folder on the VM) to this machine' )
  teardown  delete the TPU

Options:
  --name NAME          TPU name              --zone ZONE       e.g. us-central2-b
  --project PROJECT    default: gcloud's     --dry-run         print the commands, run nothing
USAGE
}

# ---------------------------------------------------------------- argument parsing

parse() {
  COMMAND=${1:-}
  [[ -n $COMMAND ]] || { usage >&2; exit 2; }
  [[ $COMMAND == -h || $COMMAND == --help ]] && { usage; exit 0; }
  shift
  NAME='' ZONE='' PROJECT='' DRY_RUN=0 ACCELERATOR='' RUNTIME='' SPOT=0
  FROM='' TO='' CONFIG='' OUT='' MESH='' MESH_AXES='' SHARDS=() EXTRA=()
  while [[ $# -gt 0 ]]; do
    case $1 in
      --name|--zone|--project|--accelerator-type|--version|--from|--to|--config|--out|--mesh|--mesh-axes|--shard)
        [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
        case $1 in
          --name) NAME=$2 ;; --zone) ZONE=$2 ;; --project) PROJECT=$2 ;;
          --accelerator-type) ACCELERATOR=$2 ;; --version) RUNTIME=$2 ;;
          --from) FROM=$2 ;; --to) TO=$2 ;; --config) CONFIG=$2 ;; --out) OUT=$2 ;;
          --mesh) MESH=$2 ;; --mesh-axes) MESH_AXES=$2 ;; --shard) SHARDS+=("$2") ;;
        esac
        shift 2 ;;
      --spot) SPOT=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      *) die "unknown argument '$1' (see $PROG --help)" ;;
    esac
  done
  [[ -n $NAME ]] || die "--name is required"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lower-case letters, digits and '-', starting with a letter"
  [[ -n $ZONE ]] || die "--zone is required"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' is not a zone like us-central2-b"
  if [[ $DRY_RUN -eq 0 ]]; then
    command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"
  fi
}

# ---------------------------------------------------------------- gcloud

WHERE=()
where() { WHERE=(--zone="$ZONE"); [[ -n $PROJECT ]] && WHERE+=(--project="$PROJECT"); return 0; }

workers() { if [[ $MODE == pod ]]; then echo all; else echo 0; fi; }

on_workers() {  # run one shell command line on the workers
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker="$(workers)" --command="$1"
}

copy_to_workers() {  # copy a local file to DEST (relative to the home folder) on the workers
  run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "${WHERE[@]}" --worker="$(workers)"
}

default_runtime() {  # the TPU software version for an accelerator type, into RUNTIME
  case $1 in
    v2-*|v3-*|v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "no default --version for accelerator type '$1'; give --version" ;;
  esac
}

# ---------------------------------------------------------------- commands

cmd_create() {
  [[ -n $ACCELERATOR ]] || die "create needs --accelerator-type"
  [[ $ACCELERATOR =~ ^v[0-9][a-z]*-([0-9]+)$ ]] || die "--accelerator-type '$ACCELERATOR' is not like v4-32 or v5litepod-8"
  local size=${BASH_REMATCH[1]}
  if [[ $MODE == vm && $size -gt 8 ]]; then
    die "$ACCELERATOR spans several hosts: use tpu_pod.sh"
  elif [[ $MODE == pod && $size -le 8 ]]; then
    die "$ACCELERATOR is a single host: use tpu_vm.sh"
  fi
  [[ -n $RUNTIME ]] || default_runtime "$ACCELERATOR"
  local extra=()
  [[ $SPOT -eq 1 ]] && extra+=(--spot)
  note "create TPU $NAME ($ACCELERATOR, runtime $RUNTIME) in $ZONE"
  run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" "${extra[@]}"
}

cmd_install() {
  local version wheel_dir wheel
  version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml")
  [[ -n $version ]] || die "no version in $REPO/pyproject.toml"
  wheel_dir=${TMPDIR:-/tmp}/breadcrumbs-jax-wheel
  wheel=$wheel_dir/breadcrumbs_jax-$version-py3-none-any.whl
  note "build $wheel from $REPO, install it on worker(s) $(workers) into ~/$VENV"
  run python3 -m pip wheel --no-deps --quiet --wheel-dir "$wheel_dir" "$REPO"
  copy_to_workers "$wheel" "${wheel##*/}"
  on_workers "set -e; cd; command -v python3.11 >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv; }; \
python3.11 -m venv $VENV; $VENV/bin/pip install -q -U pip; \
$VENV/bin/pip install -q 'jax[tpu]==$JAX_VERSION' gcsfs ./${wheel##*/}; \
$VENV/bin/python -c 'import breadcrumbs_jax, jax; print(jax.devices())'"
}

cmd_stage() {
  [[ $FROM == gs://?* ]] || die "stage needs --from gs://BUCKET/PREFIX"
  [[ -n $TO ]] || die "stage needs --to DIR (a folder on each worker)"
  local to=${TO%/}
  note "copy $FROM to $to on worker(s) $(workers)"
  on_workers "set -e; $(line mkdir -p "$to") && $(line gcloud storage cp -r "${FROM%/}/*" "$to/")"
}

cmd_merge() {
  [[ -n $CONFIG ]] || die "merge needs --config FILE (the YAML merge configuration)"
  [[ -f $CONFIG ]] || die "--config '$CONFIG' is not a file"
  [[ -n $OUT ]] || die "merge needs --out OUT"
  if [[ $MODE == pod && $OUT != gs://?* ]]; then
    die "--out '$OUT': on a slice every host writes its own shards, so OUT must be shared storage (gs://BUCKET/PATH)"
  fi
  [[ -z $MESH || $MESH =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--mesh '$MESH' is not like 8 or 2,4"
  [[ -z $MESH_AXES || $MESH_AXES =~ ^[A-Za-z_][A-Za-z0-9_]*(,[A-Za-z_][A-Za-z0-9_]*)*$ ]] || die "--mesh-axes '$MESH_AXES' is not like x,y"
  local args=(merge "breadcrumbs-merge.yaml" "$OUT")
  if [[ $MODE == pod ]]; then args+=(--distributed); else args+=(--sharded); fi
  [[ -n $MESH ]] && args+=(--mesh "$MESH")
  [[ -n $MESH_AXES ]] && args+=(--mesh-axes "$MESH_AXES")
  local s
  for s in "${SHARDS[@]}"; do args+=(--shard "$s"); done
  args+=(--report breadcrumbs-merge.report.json "${EXTRA[@]}")
  note "merge on worker(s) $(workers); output: $OUT; report: ~/breadcrumbs-merge.report.json on worker 0; log: ~/breadcrumbs-merge.log on each worker"
  copy_to_workers "$CONFIG" breadcrumbs-merge.yaml
  on_workers "set -o pipefail; cd && $(line "$VENV/bin/breadcrumbs-jax" "${args[@]}") 2>&1 | tee breadcrumbs-merge.log"
}

cmd_fetch() {
  [[ $MODE == vm ]] || die "fetch is for a single VM; a slice writes to gs:// (use gcloud storage cp)"
  [[ -n $OUT && $OUT != gs://* ]] || die "fetch needs --out OUT, the merged checkpoint's folder on the VM"
  [[ -n $TO ]] || die "fetch needs --to LOCAL_DIR"
  [[ -d $TO ]] || die "--to '$TO' is not a folder"
  note "copy $OUT from $NAME to $TO"
  run gcloud compute tpus tpu-vm scp --recurse "$NAME:$OUT" "$TO" "${WHERE[@]}" --worker=0
}

cmd_teardown() {
  note "delete TPU $NAME in $ZONE"
  run gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
}

main() {
  parse "$@"
  where
  case $COMMAND in
    create) cmd_create ;;
    install) cmd_install ;;
    stage) cmd_stage ;;
    merge) cmd_merge ;;
    fetch) cmd_fetch ;;
    teardown) cmd_teardown ;;
    *) die "unknown command '$COMMAND' (create, install, stage, merge,$( [[ $MODE == vm ]] && echo ' fetch,') teardown)" ;;
  esac
}

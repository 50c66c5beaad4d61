#!/bin/sh
# The training image's one-step loop: train a model, then export it into the model repository as
# the next version of NAME, where a service over that repository serves it once it (re)starts.
#
#   train-and-export NAME [flags of `python -m training train` except --run-dir]
#
# The run folder is $KOS_RUNS/NAME-<UTC time>. KOS_EXPORT_VARIANTS="int8 float16" also writes those
# variants (for a service with KOS_PRECISION). For anything else, run the tools directly:
# `python -m training ...`, `python -m export ...`.
set -eu

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,10s/^# \{0,1\}//p' "$0"
    exit 0
fi
name=$1
shift
run_dir="${KOS_RUNS:-/runs}/${name}-$(date -u +%Y%m%dT%H%M%SZ)"
python -m training train --run-dir "$run_dir" "$@"
variants=${KOS_EXPORT_VARIANTS:-}
# shellcheck disable=SC2086 # the variants are separate words on purpose
python -m export "$run_dir" --name "$name" --repository "${KOS_REPOSITORY:-/models}" ${variants:+--variants $variants}

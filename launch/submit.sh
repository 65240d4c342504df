#!/usr/bin/env bash
# Submit an online_kd topology as a Ray job (`ray job submit`) to a running Ray cluster.
#
#   launch/submit.sh [--insecure] TOPOLOGY.yaml [online-kd run args...]
#
# It refuses to submit without a Ray auth token (see RAY_AUTH_MODE below) unless told --insecure.
# Run it from the repository root: the current directory is uploaded as the job's working_dir and
# the job runs
#
#   python -m online_kd.cli run TOPOLOGY --engine ray --tracking-uri $MLFLOW_TRACKING_URI --out $OUT [args...]
#
# Arguments after the topology go to `online-kd run` unchanged and come after the ones above, so
# they win (`--engine local`, `--out DIR`, `--tracking-uri URI`, `--no-tracking`, `--set k=v`, `--json`).
#
# Environment:
#   RAY_ADDRESS                job server of the cluster (default http://127.0.0.1:8265, the dashboard
#                              of a local `ray start --head`; a remote cluster: `ray dashboard cluster.yaml`
#                              forwards it to that address, or use the head's http://HOST:8265).
#   RAY_AUTH_MODE              token authentication: this script sets RAY_AUTH_MODE=token and needs the
#                              cluster's token in RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH or
#                              ~/.ray/auth_token (`ray get-auth-token` on the head prints it). Without a
#                              token, or with RAY_AUTH_MODE=disabled, it refuses (exit 2) unless
#                              --insecure is given: a cluster without token auth runs any job sent to it.
#   MLFLOW_TRACKING_URI        where the run logs (default sqlite:///$PWD/mlflow.db). The job runs in a
#                              temporary copy of this directory, so a relative URI would land in that
#                              temp dir and vanish: use an ABSOLUTE sqlite path that every node sees
#                              (shared storage: NFS, EFS, a PVC...), e.g. sqlite:////shared/mlflow.db,
#                              or an MLflow server, e.g. http://mlflow.internal:5000 (best on clusters:
#                              no file locking, no shared filesystem needed).
#   ONLINE_KD_RUNS             parent of run directories (checkpoints, metrics.jsonl, Ray Train's
#                              storage) when no --out is given; default $PWD/runs. Same rule: absolute,
#                              and on storage shared by all nodes for multi-node clusters.
#   RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
#                              Ray Train controller poll interval; `ray.train.report` can block this
#                              long (default here 0.5; Ray's own default is 2 s).
#   OKD_SUBMIT_ARGS            extra `ray job submit` options, word-split, e.g.
#                              "--no-wait --submission-id dml-1 --entrypoint-num-cpus 1".
#   PYTHON                     interpreter named in the entrypoint on the cluster (default python).
#
# What the cluster needs: Ray (same version as here) with ray[default] on the head (the job server),
# and online_kd's dependencies (torch, torchvision, mlflow, pydantic, ...) on every node. The
# online_kd source itself comes with the working_dir: `python -m online_kd.cli` and the Ray Train
# workers import it from the uploaded copy, so edits here reach the cluster without reinstalling.
# Ways to provide the dependencies:
#   * an image / AMI with the project installed (`pip install .`; see launch/cluster.yaml and
#     launch/rayjob.yaml) - fastest start, reproducible; recommended for clusters;
#   * a runtime_env `pip` list (installed per job into a cached virtualenv on each node; slow the
#     first time, needs network from the nodes), e.g. add to OKD_SUBMIT_ARGS a --runtime-env file;
#   * on a laptop / local cluster: nothing, the package is already installed.
# The upload (working_dir) must stay under 512 MiB (Ray's max gRPC message; keep it small): runs, data,
# MLflow stores, checkpoints and .git are excluded below, and Ray also skips .gitignore'd files.
#
# Example (laptop):
#   ray start --head --num-cpus 4 --disable-usage-stats
#   export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db
#   launch/submit.sh topologies/quick/dml.yaml --set train.epochs=2 --json
#   ray stop
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    echo "See the comments at the top of $0 for the environment variables."
}

insecure=0
if [[ "${1:-}" == "--insecure" ]]; then
    insecure=1
    shift
fi
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi

topology=$1
shift
if [[ ! -f "$topology" ]]; then
    echo "submit.sh: no topology file '$topology' (run from the repository root)" >&2
    exit 2
fi
case "$topology" in
    /*) echo "submit.sh: note: '$topology' is absolute; the job resolves it on the cluster" >&2 ;;
esac

export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}

# --- what the user already chose --------------------------------------------------------------
has_out=0; has_resume=0; has_uri=0; no_tracking=0
for a in "$@"; do
    case "$a" in
        --out|--out=*) has_out=1 ;;
        --resume) has_resume=1 ;;
        --tracking-uri|--tracking-uri=*) has_uri=1 ;;
        --no-tracking) no_tracking=1 ;;
    esac
done

# --- MLflow: must be absolute (the job's cwd is a temp copy of this directory) ----------------
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
case "$MLFLOW_TRACKING_URI" in
    sqlite:////*|http://*|https://*|databricks*|postgresql*|mysql*|mssql*) ;;
    sqlite:///*)
        echo "submit.sh: MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI is relative; the job would write it into" \
             "its temporary working dir. Use sqlite:////ABSOLUTE/path (on shared storage) or http://server" >&2
        exit 2 ;;
    *) if [[ $has_uri -eq 0 && $no_tracking -eq 0 ]]; then
           echo "submit.sh: note: MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI; make sure every node reaches it" >&2
       fi ;;
esac

# --- run directory: absolute, outside the temporary working dir --------------------------------
runs_dir=${ONLINE_KD_RUNS:-$PWD/runs}
case "$runs_dir" in
    /*) ;;
    *) echo "submit.sh: ONLINE_KD_RUNS must be an absolute path (got '$runs_dir')" >&2; exit 2 ;;
esac
out_args=()
if [[ $has_out -eq 0 ]]; then
    if [[ $has_resume -eq 1 ]]; then
        echo "submit.sh: --resume needs --out DIR (the run directory to continue)" >&2
        exit 2
    fi
    stem=$(basename "$(dirname "$topology")")-$(basename "${topology%.*}")
    out_args=(--out "$runs_dir/$stem-$(date +%Y%m%d-%H%M%S)")
fi
uri_args=()
[[ $no_tracking -eq 0 ]] && uri_args=(--tracking-uri "$MLFLOW_TRACKING_URI")

# --- token authentication: on, unless told --insecure -----------------------------------------
has_token=0
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    has_token=1
elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    [[ -s "$RAY_AUTH_TOKEN_PATH" ]] && has_token=1
elif [[ -s "${HOME:-/nonexistent}/.ray/auth_token" ]]; then
    has_token=1
fi
if [[ $insecure -eq 1 ]]; then
    echo "submit.sh: warning: --insecure: submitting without requiring token authentication" >&2
    [[ $has_token -eq 1 && -z "${RAY_AUTH_MODE:-}" ]] && export RAY_AUTH_MODE=token
elif [[ "${RAY_AUTH_MODE:-token}" != "token" ]]; then
    echo "submit.sh: RAY_AUTH_MODE=$RAY_AUTH_MODE: refusing to submit without token authentication" \
         "(unset it and provide the cluster's token, or pass --insecure)" >&2
    exit 2
elif [[ $has_token -eq 0 ]]; then
    echo "submit.sh: no Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): refusing to" \
         "submit without token authentication ('ray get-auth-token' on the head prints it; --insecure to submit anyway)" >&2
    exit 2
else
    export RAY_AUTH_MODE=token
fi

health=${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.5}

# --- runtime env: env vars for the driver and every worker; what not to upload ----------------
runtime_env=$(MLFLOW_TRACKING_URI="$MLFLOW_TRACKING_URI" OKD_HEALTH="$health" python3 - <<'EOF'
import json, os
print(json.dumps({
    "env_vars": {
        "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["OKD_HEALTH"],
        "PYTHONUNBUFFERED": "1",
    },
    "excludes": [".git", "runs/", "mlruns/", "mlartifacts/", "mlflow.db", "*.db", "data/", "checkpoints/",
                 "*.pt", "*.pth", "*.ckpt", ".venv/", "venv/", "__pycache__/", ".pytest_cache/", ".hypothesis/",
                 "*.egg-info/", "build/", "dist/", ".benchmarks/"],
}))
EOF
)

# shellcheck disable=SC2206  # OKD_SUBMIT_ARGS is meant to be word-split
extra=(${OKD_SUBMIT_ARGS:-})
cmd=(ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" "${extra[@]}"
     -- "${PYTHON:-python}" -m online_kd.cli run "$topology" --engine ray "${uri_args[@]}" "${out_args[@]}" "$@")
echo "submit.sh: RAY_ADDRESS=$RAY_ADDRESS RAY_AUTH_MODE=${RAY_AUTH_MODE:-<unset>}" >&2
{ printf 'submit.sh:'; printf ' %q' "${cmd[@]}"; echo; } >&2
exec "${cmd[@]}"

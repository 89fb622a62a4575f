#!/usr/bin/env bash
# Creates (or reuses) the project-local virtual environment .venv from pinned versions.
#
# The TorchRec stack is pinned as one unit: torch 2.13.0 (CPU wheel), fbgemm-gpu-cpu 1.8.0 and
# torchrec 1.9.2. torchrec declares a dependency on the CUDA build "fbgemm-gpu", so it is installed
# with --no-deps; its real runtime deps are the extra "ranker-cpu" of pyproject.toml. A second run is
# a no-op (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LLMFEAT_VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.llmfeat-stamp"
want=$(cat pyproject.toml setup.py constraints.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "error: $PYTHON is older than Python 3.10; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

echo "[bootstrap] creating $VENV from constraints.txt (first run takes a few minutes)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first and exactly pinned: a resolver that sees a looser torch range pulls CUDA wheels.
"${PIP[@]}" install -c constraints.txt torch==2.13.0 fbgemm-gpu-cpu==1.8.0
# ranker-cpu: the TorchRec ranker's dependencies but torchrec itself (installed below); dev: the test
# tools; spark: pyspark for the Spark offline store/engine (tests/test_spark_store.py
# runs it; Spark itself also needs Java 17+, which .ci/run installs and this script does not);
# examples: scikit-learn and LightGBM for examples/ (tests/test_examples.py)
"${PIP[@]}" install -c constraints.txt -e '.[ranker-cpu,dev,spark,examples]'
"${PIP[@]}" install -c constraints.txt --no-deps torchrec==1.9.2
"$VENV/bin/python" -c 'import torch, fbgemm_gpu, torchrec, feast, grpc, redis, transformers, pyspark, sklearn, lightgbm' \
  || { echo "error: the installed stack does not import; see above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "[bootstrap] ready: $VENV"

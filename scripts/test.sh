#!/usr/bin/env bash
# Set everything up and run the whole test suite. The tests start the services they need themselves
# (a local Ray cluster, moto's S3 server and an `mlflow server`, all on 127.0.0.1).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit $?
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 AWS_EC2_METADATA_DISABLED=true
.venv/bin/python -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "raybind: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit $rc

#!/usr/bin/env bash
# The GPU checks of the multi-node issue, as one script for a session lent a device machine
# (see ../.library/device/README.md): Fashion-MNIST with --budget 60s (3 seeds), training
# speed against the compute floor at 28 px (small CNN) and 224 px (ResNet-18), and the cache
# held on the GPU against the streamed one (the `streamed` switch). Writes bench/results/
# JSON files that bench/tables.py renders into docs/BENCHMARKS.md. About 8 minutes.
#
#   bash bench/gpu_checks.sh          # in the repository root, with .venv installed
set -euo pipefail
cd "$(dirname "$0")"
PY=../.venv/bin/python
$PY -c "import torch; assert torch.cuda.is_available(), 'no GPU here'; print(torch.cuda.get_device_name())"
$PY budget_regression.py --budgets 60s --seeds 0,1,2 --name budget_regression_gpu_60s
$PY compute_floor.py --rows small_cnn-28,resnet18-224 --switches default,streamed \
    --pairs 3 --seconds 10 --profile never --name compute_floor_gpu

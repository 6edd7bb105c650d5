#!/usr/bin/env bash
# The sweep of docs/results.md ("A sweep over the two CIFAR-10 ResNets"): ResNet-20 and ResNet-56
# x fold, prune-l1, prune-l2 x ratios 0.1, 0.3, 0.5, 0.7 x repair none, bn-recalibrate, 48 builds
# with the default build flags, judged on the 1,000 lossless CIFAR-10 test images with a 5-point
# gate. `foldship sweep` prints the paired fold - prune table and the selection, and writes
# runs/sweep_resnets/ (results.jsonl: every job's report; summary.json; sweep.md; the plots).
#
#     bash benchmarks/sweep_resnets.sh [extra foldship sweep flags, e.g. --workers 1]
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=../shared/data/checkpoints/cifar10_resnet_akamaster
exec .venv/bin/foldship sweep \
    --checkpoint "cifar_resnet20=$CKPT/resnet20-12fca82f.th" \
    --checkpoint "cifar_resnet56=$CKPT/resnet56-4bfd9763.th" \
    --method fold --method prune-l1 --method prune-l2 --ratio 0.1 --ratio 0.3 --ratio 0.5 --ratio 0.7 \
    --repair none --repair bn-recalibrate --calibration-data ../shared/data/cifar10/cifar10_test_10k_from_jpeg.npz \
    --max-accuracy-drop 0.05 --select --out runs/sweep_resnets --overwrite "$@"

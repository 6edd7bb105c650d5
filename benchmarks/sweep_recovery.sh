#!/usr/bin/env bash
# The recovery sweep of docs/recovery.md ("In a sweep"): ResNet-20 folded with --groups inner at
# ratios 0.1-0.4, reconstruct+bn-recalibrate, without and with distillation (2 epochs on the
# 9,000 JPEG-decoded calibration images), judged on the 1,000 lossless CIFAR-10 test images with a
# 1-point gate; --select builds the fastest passing job into <out>/selected.
#
#     bash benchmarks/sweep_recovery.sh [extra foldship sweep flags, e.g. --round-to auto --out runs/x]
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=../shared/data/checkpoints/cifar10_resnet_akamaster
exec .venv/bin/foldship sweep \
    --checkpoint "cifar_resnet20=$CKPT/resnet20-12fca82f.th" \
    --method fold --ratio 0.1 --ratio 0.2 --ratio 0.3 --ratio 0.4 --groups inner \
    --repair reconstruct+bn-recalibrate --calibration-data ../shared/data/cifar10/cifar10_test_10k_from_jpeg.npz \
    --finetune none --finetune distill \
    --max-accuracy-drop 0.01 --select --out runs/sweep_recovery --overwrite "$@"

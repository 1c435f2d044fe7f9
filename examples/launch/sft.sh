#!/usr/bin/env bash
# LongLoRA stage 2, SFT on LongAlpaca-format data: `hf-longlora sft` (TRL's SFTTrainer) under `accelerate launch`.
#
#   [ACCELERATE_CONFIG=examples/accelerate/<x>.yaml] examples/launch/sft.sh CONFIG.yaml [--key value ...]
#
# Run from anywhere; paths are relative to the repository root. Flags after the config override its keys.
#   8 GPUs, ZeRO-2:  ACCELERATE_CONFIG=examples/accelerate/deepspeed_zero2.yaml \
#                    examples/launch/sft.sh examples/configs/llama2_7b_longalpaca_sft.yaml
#   1 GPU, QLoRA:    examples/launch/sft.sh examples/configs/llama2_7b_qlora_sft_1gpu.yaml
#   CPU, tiny:       ACCELERATE_CONFIG=examples/accelerate/cpu.yaml \
#                    examples/launch/sft.sh examples/configs/sft_tiny_cpu.yaml
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 1 ]; then
    echo "usage: [ACCELERATE_CONFIG=...] $0 CONFIG.yaml [--key value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
exec "${ACCELERATE:-accelerate}" launch --config_file "${ACCELERATE_CONFIG:-examples/accelerate/single_process.yaml}" \
    -m hf_longlora.cli sft --config "$CONFIG" "$@"

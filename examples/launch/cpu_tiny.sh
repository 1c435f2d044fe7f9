#!/usr/bin/env bash
# Both LongLoRA stages end to end on CPU in a few minutes, offline: a tiny base (native 256 tokens), stage 1 to
# 1024 tokens on the standard library's long files, merge, the offline LongAlpaca-format sample, stage 2 SFT.
#
#   examples/launch/cpu_tiny.sh            # outputs in outputs/cpu_tiny/
#   OUT=/tmp/run QLORA=1 examples/launch/cpu_tiny.sh --max_steps 2    # flags go to both training stages
#
# PYTHON (default: python) and ACCELERATE (default: accelerate) pick the interpreter and launcher.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-outputs/cpu_tiny}
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-examples/accelerate/cpu.yaml}
SFT_EXTRA=()
if [ -n "${QLORA:-}" ]; then
    SFT_EXTRA+=(--load_in_4bit true)   # NF4 base (bitsandbytes works on CPU)
fi

"$PYTHON" examples/launch/tiny_base.py --out "$OUT/base"
examples/launch/pretrain.sh examples/configs/pretrain_tiny_cpu.yaml \
    --model_name_or_path "$OUT/base" --output_dir "$OUT/pretrain" "$@"
"$PYTHON" -m hf_longlora.cli merge --base "$OUT/base" --adapter "$OUT/pretrain" --out "$OUT/merged" --overwrite
"$PYTHON" -m hf_longlora.cli data longalpaca-sample --out "$OUT/longalpaca-sample.jsonl" \
    --records 24 --length 960 --min-length 300 --tokenizer "$OUT/merged"
examples/launch/sft.sh examples/configs/sft_tiny_cpu.yaml --model_name_or_path "$OUT/merged" \
    --data_files "$OUT/longalpaca-sample.jsonl" --output_dir "$OUT/sft" "${SFT_EXTRA[@]}" "$@"
echo "cpu_tiny: stage-1 adapter $OUT/pretrain, merged $OUT/merged, SFT adapter $OUT/sft"

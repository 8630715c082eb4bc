#!/usr/bin/env bash
# Flickr8k end to end for one named configuration: extract -> train -> evaluate.
#
#   benchmarks/flickr8k.sh CONFIG [WORK_DIR]
#
# CONFIG is one of the rows of docs/RESULTS.md:
#   merge_pool      merge decoder on MobileNetV2 a=0.5 pooled features (the first baseline;
#                   not the bundled model, which is an ensemble of EfficientNet-Lite2 attention
#                   decoders: see "Issue #12" in docs/RESULTS.md for how it was made)
#   inject_pool     Show-and-Tell style inject decoder on pooled features
#   attention_conv  soft attention over the 7x7x1280 conv features
#
# Data: FLICKR8K (default ../shared/flickr8k beside the repo). Feature caches are shared between
# configurations and reused (extraction resumes), run folders and reports go under WORK_DIR
# (default work/flickr8k, ignored by git). Extra training options can be passed in TRAIN_ARGS,
# e.g. TRAIN_ARGS="--epochs 5" benchmarks/flickr8k.sh merge_pool.
# Offline, seed the Keras cache first: export KERAS_HOME=... (see README).
set -euo pipefail

config=${1:?usage: benchmarks/flickr8k.sh CONFIG [WORK_DIR]  (merge_pool | inject_pool | attention_conv)}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${2:-$repo/work/flickr8k}
data=${FLICKR8K:-$repo/../shared/flickr8k}
text=$data/Flickr8k_text
images=$data/Flicker8k_Dataset
encoder=mobilenet_v2_0.5

case $config in
  merge_pool)     layer=pool; dtype=float32; args=(--decoder merge --epochs 20 --max-length 25 --schedule plateau --patience 4) ;;
  inject_pool)    layer=pool; dtype=float32; args=(--decoder inject --epochs 20 --max-length 25 --schedule plateau --patience 4) ;;
  attention_conv) layer=conv; dtype=float16; args=(--decoder attention --epochs 8 --max-length 22 --schedule plateau --patience 3) ;;
  *) echo "unknown configuration '$config'" >&2; exit 2 ;;
esac

mkdir -p "$work/features"
for split in train dev test; do
  captioner extract "$text/Flickr_8k.${split}Images.txt" --images-dir "$images" \
    --encoder $encoder --layer $layer --dtype $dtype --batch-size 64 \
    --out "$work/features/${encoder}_${layer}_${split}.h5"
done

run=$work/runs/$config
if [ -f "$run/checkpoint.h5" ]; then resume=(--resume); else resume=(); fi
# shellcheck disable=SC2086
captioner train --captions "$text/Flickr8k.token.txt" \
  --train-features "$work/features/${encoder}_${layer}_train.h5" \
  --val-features "$work/features/${encoder}_${layer}_dev.h5" \
  "${args[@]}" ${TRAIN_ARGS:-} --out "$run" "${resume[@]}"

captioner evaluate --model "$run" --captions "$text/Flickr8k.token.txt" \
  --features "$work/features/${encoder}_${layer}_test.h5" --images-dir "$images" \
  --beam-size 1 3 5 --out "$work/reports/$config"
captioner evaluate --model "$run" --captions "$text/Flickr8k.token.txt" \
  --features "$work/features/${encoder}_${layer}_test.h5" \
  --beam-size 3 5 --alpha 0.7 --out "$work/reports/${config}_alpha0.7" --quiet
echo "report: $work/reports/$config/report.md"

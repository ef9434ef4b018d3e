#!/usr/bin/env bash
# GPU readiness: one script, at most ~5 minutes, that exercises every GPU path of train.py on a CUDA machine.
#
#   bash benchmarks/gpu_check.sh                        # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh /data/hdfs_train       # another training file (DeepLog text or JSON)
#   DEVICE=cpu STEPS=20 bash benchmarks/gpu_check.sh    # dry run of the script itself on a CPU machine
#
# It trains a few hundred steps each with fp16 + GradScaler, with bf16, and (when more than one GPU is
# visible) with DataParallel, on HDFS-like data (../shared/data/hdfs/hdfs_train when present, else the
# shipped sample), then once more on a generated 200,000-session file with a 10,000-event vocabulary and
# batches of 1024 (the load where the input pipeline matters). For each run it prints the step lines
# (loss, LR, tokens/s, the share of time spent waiting for data, the GPU field) and the per-GPU block
# (memory, utilisation, temperature, power from pynvml), then a summary line. Needs torch with CUDA,
# numpy, pyyaml, tqdm, ijson and nvidia-ml-py.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-300}
BIG=${BIG:-200000}   # sessions of the throughput run
DATA=${1:-../shared/data/hdfs/hdfs_train}
[ -e "$DATA" ] || DATA=data/sample/train
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

python3 - "$DEVICE" <<'EOF'
import sys, torch
print(f"torch {torch.__version__} | CUDA available: {torch.cuda.is_available()} | GPUs: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
try:
    import pynvml
    pynvml.nvmlInit()
    print(f"pynvml: driver {pynvml.nvmlSystemGetDriverVersion()}, {pynvml.nvmlDeviceGetCount()} devices")
except Exception as error:
    print(f"pynvml unavailable: {error}")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA GPU: run this on a GPU machine (or DEVICE=cpu for a dry run)")
EOF
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")

# run NAME DATA VOCAB BATCH AMP_DTYPE MULTI_GPU EPOCHS: train with a config written for it, print its lines
run() {
  local name=$1 data=$2 vocab=$3 batch=$4 amp=$5 multi=$6 epochs=$7
  cat > "$WORK/$name.yaml" <<YAML
model: {vocab_size: $vocab}
training: {batch_size: $batch, epochs: $epochs, amp_dtype: $amp, use_multi_gpu: $multi, device: $DEVICE,
           log_every_steps: 25, gpu_stats_every_steps: 100, save_every_steps: 0, save_every_epoch: false,
           evaluate_after_training: false, warmup_steps: 20, output_dir: $WORK/$name}
early_stopping: {enabled: false}
lazy_loading: {cache_dir: $WORK/cache}
data: {preprocessed_dir: $data}
YAML
  echo
  echo "=== $name: $data, vocab $vocab, batch $batch, $amp, multi-GPU $multi ==="
  local started=$SECONDS
  timeout 120 python3 train.py --config "$WORK/$name.yaml" 2>&1 | grep -E "Step|GPU|Epoch|precision|cache|error" \
    | tail -n 14 || echo "!! $name failed or timed out"
  python3 - "$WORK/$name/training.log" "$name" $((SECONDS - started)) <<'EOF'
import re, sys
log = open(sys.argv[1]).read()
rates = [int(r.replace(",", "")) for r in re.findall(r"([\d,]+) tok/s", log)][1:]  # the first includes warm-up
waits = [int(w) for w in re.findall(r"data wait (\d+)%", log)][1:]
steps = re.findall(r"\[Step (\d+)\]", log)
if rates:
    print(f"SUMMARY {sys.argv[2]}: {steps[-1]} steps in {sys.argv[3]} s | median {sorted(rates)[len(rates) // 2]:,} "
          f"tok/s | data wait median {sorted(waits)[len(waits) // 2]}%, max {max(waits)}%")
else:
    print(f"SUMMARY {sys.argv[2]}: no step lines")
EOF
}

# HDFS-like: a few hundred steps per precision (steps/epoch = sessions x 0.9 / batch)
SESSIONS=$(python3 -c "import sys; sys.path.insert(0, '.'); import dataset; print(sum(1 for _ in dataset.iter_sessions('$DATA')))")
EPOCHS=$(( STEPS * 64 / (SESSIONS * 9 / 10) + 1 ))
run fp16 "$DATA" 29 64 float16 false $EPOCHS
run bf16 "$DATA" 29 64 bfloat16 false $EPOCHS
if [ "$GPUS" -gt 1 ]; then
  run data_parallel "$DATA" 29 $((64 * GPUS)) bfloat16 true $EPOCHS
else
  echo; echo "=== data_parallel: skipped (one GPU visible) ==="
fi

# Throughput where the input pipeline matters: $BIG sessions, vocabulary 10,000, batches of 1024.
python3 benchmarks/ingest.py --data "$WORK/big.json" --vocab-size 10000 --generate "$BIG" | tail -n 6
run throughput_bf16 "$WORK/big.json" 10000 1024 bfloat16 true 2

#!/usr/bin/env bash
# The GPU measurements the issues ask for, in one script that fits a lent GPU machine's 15 minutes.
#
# The device image has torch, peft, pyarrow and tokenizers but an older transformers and no PyAV; carry
# them as Python 3.12 wheels. Here, in the repository root, once:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 av==18.1.0
#
# then run this script there with `.whl` carried (49 MB of the 64 MiB a call may carry). Ray's wheel (79 MB)
# does not fit beside them, so this measures the plain loop against the raw step (issue 4) and the encoder's
# raw fp16 forward rate; the Ray Train and Ray Data rows need Ray carried in pieces over two calls.
set -euo pipefail
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# Issue 4: training samples/s of our loop against the raw LoRA step, Qwen2-0.5B's shape, bf16, 256 tokens.
python3 bench/train.py --llm random-qwen2-0.5b --lora-r 64 --workers 0 --videos 128 --epochs 3 \
    --global-batch-size 64 --micro-batch-size 16 --raw-tokens 256

# Issue 3: the encoder's raw fp16 forward rate at ViT-L/14's shape (what the pipeline's encoders should reach).
python3 - <<'PY'
import sys, time, torch
sys.path.insert(0, ".")
from timerefine.encoders import VIT_L_14_ENCODER, ClipImageEncoder
encoder = ClipImageEncoder(VIT_L_14_ENCODER)
for batch in (64, 256):
    pixels = torch.randn(batch, 3, 224, 224, device=encoder.device, dtype=encoder.dtype)
    with torch.inference_mode():
        encoder.model(pixel_values=pixels)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            encoder.model(pixel_values=pixels)
        torch.cuda.synchronize()
    print(f"ViT-L/14 fp16 forward, batch {batch}: {10 * batch / (time.perf_counter() - started):.0f} frames/s")
PY

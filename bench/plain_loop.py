"""What a user writes without timerefine: decord resizing in the decoder, 100 linspace indices, a centre
crop, the same CLIP through transformers at 2 torch threads, one process. bench/extract.py times it end
to end (imports included) against ``timerefine extract``.

    python bench/plain_loop.py VIDEO_DIR ENCODER_DIR OUT.npz
"""

import sys
from pathlib import Path

import decord
import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

videos, encoder_dir, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(2)
model = CLIPVisionModelWithProjection.from_pretrained(encoder_dir).eval()
processor = CLIPImageProcessor.from_pretrained(encoder_dir)
size = processor.crop_size["height"]
mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
features = {}
with torch.inference_mode():
    for path in sorted(videos.glob("*.mp4")):
        height, width = decord.VideoReader(str(path))[0].shape[:2]
        scale = size / min(height, width)
        reader = decord.VideoReader(str(path), width=round(width * scale), height=round(height * scale))
        frames = reader.get_batch(np.linspace(0, len(reader) - 1, 100).astype(int)).asnumpy()
        top, left = (frames.shape[1] - size) // 2, (frames.shape[2] - size) // 2
        frames = frames[:, top : top + size, left : left + size]
        pixels = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - mean) / std
        features[path.stem] = model(pixel_values=pixels).image_embeds.half().numpy()
np.savez(out, **features)
print(f"{len(features)} videos")

"""Reading images, videos, GIFs and frame folders into RGB arrays, with every failure a named ``DataError``: the
media API the encoder, the frame cache, the doctor and ``prepare`` use. It is three modules:

* :mod:`.image` — media paths and images (Pillow: header-only probing, a decompression-bomb guard, every mode to
  8-bit RGB);
* :mod:`.video` — what a video is (PyAV packet scan, numbered as torchcodec numbers frames), frame folders and
  GIFs, and which frames a stage trains on (the processor's sampling rule);
* :mod:`.decode` — only the sampled frames decoded, each turned into torchcodec's RGB bytes and resized at once
  with the processor's resize.

What a model trained here sees must be what transformers' ``VideoLlama3Processor`` gives it at inference
(``docs/data_format.md``).
"""

from videollama3_train.data.decode import decode_video, resize_frame
from videollama3_train.data.image import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    load_image,
    probe_image,
    resolve_media_path,
)
from videollama3_train.data.video import (
    FrameSample,
    VideoInfo,
    official_frame_indices,
    probe_video,
    processor_frame_indices,
    prompt_timestamps,
    sample_frame_times,
    sample_frames,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "FrameSample",
    "VideoInfo",
    "decode_video",
    "load_image",
    "official_frame_indices",
    "probe_image",
    "probe_video",
    "processor_frame_indices",
    "prompt_timestamps",
    "resize_frame",
    "resolve_media_path",
    "sample_frame_times",
    "sample_frames",
]

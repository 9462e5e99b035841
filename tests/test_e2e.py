"""End to end: generated sample data -> the four-stage pipeline with the tiny preset -> a transformers-native export
that runs the usage examples of the transformers documentation (seed/videollama3_transformers_doc.md), offline.

torchcodec is not a dependency, and transformers' video processor decodes video *paths* only with it: the examples
here decode the video with PyAV and pass the frames with their ``VideoMetadata`` (see docs/stages.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STAGE_DIRS = ("1_encoder_adaptation", "2_alignment", "3_multitask_sft", "4_video_finetune")


def decode_video(path: Path):
    """All frames of a video as ``(T, H, W, 3)`` uint8, with the metadata the processor samples frames from."""
    from transformers.video_utils import VideoMetadata

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        fps = float(stream.average_rate)
    meta = VideoMetadata(
        total_num_frames=len(frames),
        fps=fps,
        duration=len(frames) / fps,
        frames_indices=list(range(len(frames))),
    )
    return frames, meta


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from test_sample_data import gen

    out = tmp_path_factory.mktemp("sample")
    gen.generate(out, seed=0, n_train=120, n_heldout=24)
    return out


def _argv(sample: Path, out: Path) -> list[str]:
    return [
        "model=tiny",
        "data=file",
        f"data.path={sample / 'train.jsonl'}",
        f"data.root={sample}",
        f"data.heldout_path={sample / 'heldout.jsonl'}",
        "data.heldout_max_samples=8",
        "eval.max_new_tokens=4",
        "eval.log_generations=1",
        "logger=disabled",
        "trainer.epochs=1",
        f"output_dir={out}",
    ]


def run_pipeline(argv: list[str]) -> dict:
    """What ``python -m videollama3_train.pipeline <argv>`` runs, in this process."""
    from videollama3_train.config import compose
    from videollama3_train.run import run_pipeline

    return run_pipeline(compose("pipeline", argv), argv)


@pytest.fixture(scope="module")
def pipeline_run(sample, tmp_path_factory) -> tuple[Path, list[str], dict]:
    out = tmp_path_factory.mktemp("pipeline")
    argv = _argv(sample, out)
    results = run_pipeline(argv)
    return out, argv, results


@pytest.fixture(scope="module")
def export(pipeline_run) -> Path:
    return pipeline_run[0] / STAGE_DIRS[-1] / "export"


@pytest.fixture(scope="module")
def loaded(export):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(export, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(export, local_files_only=True)
    return model, processor


def _media(sample: Path) -> tuple[Path, Path]:
    return (
        sorted((sample / "media" / "images").glob("heldout_colour_*.png"))[0],
        sorted((sample / "media" / "videos").glob("heldout_video_colour_*.mp4"))[0],
    )


def _generate(model, processor, inputs, max_new_tokens: int = 6) -> list[str]:
    with torch.no_grad():
        output_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    generated_ids = [o[len(i) :] for i, o in zip(inputs.input_ids, output_ids)]
    assert all(len(g) >= 1 for g in generated_ids)
    return processor.batch_decode(generated_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline itself
# ----------------------------------------------------------------------------------------------------------------


def test_pipeline_chains_four_stages(pipeline_run) -> None:
    out, _, results = pipeline_run
    assert list(results) == ["encoder_adaptation", "alignment", "multitask_sft", "video_finetune"]
    prev = None
    for name, d in zip(results, STAGE_DIRS):
        stage = out / d
        assert (stage / "export" / "config.json").is_file()
        assert (stage / "results.json").is_file() and (stage / "metrics.jsonl").is_file()
        resolved = json.loads((stage / "resolved_config.json").read_text())
        assert resolved["stage"] == name
        assert resolved["init_from"] == (None if prev is None else str(prev / "export"))
        final = results[name]["final"]
        assert np.isfinite(final["loss"]) and not final.get("interrupted")
        prev = stage
    s4 = json.loads((out / STAGE_DIRS[-1] / "resolved_config.json").read_text())
    assert s4["encode"]["image_merge_size"] == 2 and s4["encode"]["use_token_compression"] is True
    assert "heldout_after" in results["video_finetune"]


def test_summary_and_loss_plot(pipeline_run) -> None:
    out = pipeline_run[0]
    md = (out / "summary.md").read_text()
    for name in ("encoder_adaptation", "alignment", "multitask_sft", "video_finetune"):
        assert name in md
    png = out / "loss.png"
    assert png.stat().st_size > 1000
    with Image.open(png) as im:
        assert im.format == "PNG"


def test_rerun_skips_finished_stages(pipeline_run, capsys) -> None:
    out, argv, results = pipeline_run
    mtimes = {d: (out / d / "export" / "config.json").stat().st_mtime_ns for d in STAGE_DIRS}
    capsys.readouterr()
    again = run_pipeline(argv)
    printed = capsys.readouterr().out
    assert printed.count("skipping") == 4, printed
    assert {d: (out / d / "export" / "config.json").stat().st_mtime_ns for d in STAGE_DIRS} == mtimes
    assert again["video_finetune"]["final"] == results["video_finetune"]["final"]


def test_rerun_after_crash_resumes_unfinished_stage(pipeline_run, capsys) -> None:
    """A crash after the last checkpoint but before the export: the rerun skips stages 1-3 and resumes stage 4
    from its checkpoint (no step is trained again), then exports."""
    import shutil

    out, argv, _ = pipeline_run
    last = out / STAGE_DIRS[-1]

    def trained_steps() -> list[int]:  # training rows only: the rerun evaluates again (results.json is gone)
        rows = [json.loads(x) for x in (last / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in rows if "loss" in r]

    steps_before = trained_steps()
    shutil.rmtree(last / "export")
    (last / "results.json").unlink()
    capsys.readouterr()
    run_pipeline(argv)
    printed = capsys.readouterr().out
    assert printed.count("skipping") == 3, printed
    assert "resumed from" in printed, printed
    assert (last / "export" / "config.json").is_file() and (last / "results.json").is_file()
    assert steps_before and trained_steps() == steps_before


# ----------------------------------------------------------------------------------------------------------------
# The export, used as the transformers documentation shows
# ----------------------------------------------------------------------------------------------------------------


def test_export_is_native_and_offline(export) -> None:
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "video_llama_3"
    assert list(export.glob("*.safetensors"))
    assert (export / "tokenizer_config.json").is_file()
    assert any(export.glob("*processor*.json"))


def test_generate_image_and_video_prompt(loaded, sample) -> None:
    model, processor = loaded
    image, video = _media(sample)
    frames, meta = decode_video(video)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(image)},
                {"type": "video", "video": frames},
                {"type": "text", "text": "What colour is the shape, and where does the square move?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"fps": 1, "video_metadata": [meta]},
    )
    assert inputs["pixel_values"].shape[1] == inputs["pixel_values_videos"].shape[1] == 588
    assert inputs["video_grid_thw"][0, 0] == round(meta.duration)  # sampled at 1 fps
    (text,) = _generate(model, processor, inputs)
    assert isinstance(text, str)


def test_doc_single_image(loaded, sample) -> None:
    model, processor = loaded
    image, _ = _media(sample)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(image).convert("RGB")},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    assert "pixel_values" in inputs and "pixel_values_videos" not in inputs
    assert len(_generate(model, processor, inputs)) == 1


def test_doc_single_video(loaded, sample) -> None:
    model, processor = loaded
    _, video = _media(sample)
    frames, meta = decode_video(video)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": frames},
                {"type": "text", "text": "What happened in the video?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"fps": 1, "video_metadata": [meta]},
    ).to(model.device)
    assert "pixel_values_videos" in inputs and "pixel_values" not in inputs
    assert len(_generate(model, processor, inputs)) == 1


def test_doc_batched_mixed_media(loaded, sample) -> None:
    model, processor = loaded
    image, video = _media(sample)
    frames, meta = decode_video(video)
    conversation1 = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(image)},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ]
    conversation2 = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": frames},
                {"type": "text", "text": "What happened in the video?"},
            ],
        }
    ]
    conversation3 = [{"role": "user", "content": "What color is a banana?"}]
    conversations = [conversation1, conversation2, conversation3]
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        padding=True,
        padding_side="left",
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"fps": 1, "video_metadata": [meta]},
    ).to(model.device)
    assert inputs.input_ids.shape[0] == 3
    mask = inputs.attention_mask
    assert bool(mask[:, -1].all()) and not bool(mask[:, 0].all())  # left padding
    texts = _generate(model, processor, inputs)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    # Left padding must not change the answers: each prompt alone generates the same tokens.
    alone = processor.apply_chat_template(
        conversation3, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert _generate(model, processor, alone) == texts[2:]

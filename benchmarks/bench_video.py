"""B1: reading one video's training frames -- ours vs the official approach vs the frame cache.

For each generated clip (25 fps, textured motion, H.264, fixed keyframe interval) three methods produce the same
thing, the frames of one training sample at their final size (fps 1, at most 180 frames, 10240-token budget,
merge 2):

* ``official``: decode the WHOLE clip at native resolution (PyAV, threaded), convert one frame per second to RGB
  and keep them all, subsample evenly to 180, then resize each kept frame with PIL bicubic. This is the official
  pipeline (an ffmpeg subprocess piping every 1-fps native frame into numpy) minus its pipe copy, so it is a
  favourable emulation. Keeping every 1-fps native frame is what makes its memory grow with the clip length; when
  that would exceed ``--official-mem-gb`` the run keeps only the frames that survive subsampling instead (an
  optimistic lower bound, marked ``*`` in the table, with the faithful projection beside it).
* ``ours``: the default training path, exact to transformers' processor: ``media.decode_video`` on the frames the
  processor samples (``media.sample_frames``), seeking across keyframe gaps, converting only kept frames to the
  RGB bytes torchcodec produces and resizing each to the processor's target size (torchvision bicubic +
  antialias) as soon as it is decoded, so only one native frame is ever held.
* ``ours-scaled``: the opt-in approximate path (``encode.decode_scale=True``): FFmpeg's scaler shrinks each kept
  frame during conversion (to no less than the target), then the same exact resize. What ``ours`` was before the
  exact path became the default (then with a PIL resize).
* ``cache``: ``frame_cache.read_cached_frames`` of an entry built beforehand by ``build_frame_cache`` (the
  ``prepare`` step, timed separately as ``prepare``: one decode, paid once per dataset, not per epoch).

Every measurement runs in a fresh subprocess so its peak RSS (``VmHWM``) is its own; imports are outside
the timed region but inside the RSS (a bare child with numpy, PyAV, torch and our data modules is ``base`` MB,
printed below the table). ``out MB`` is the size of the method's result, the sampled frames at target size
(uint8); ``RSS - base`` against it is what decoding costs beyond holding the output.

    nice -n 10 python benchmarks/bench_video.py --quick          # 720p, 1 and 10 min
    nice -n 10 python benchmarks/bench_video.py                  # 720p + 1080p, 1 and 10 min, GOP 2 s and 8 s
    nice -n 10 python benchmarks/bench_video.py --minutes 60 --resolutions 720p
    nice -n 10 python benchmarks/bench_video.py --plan --quick   # planning a record vs encoding it
    # encode_record's peak RSS beyond its output, under two code trees (a worktree of another commit and this one)
    nice -n 10 python benchmarks/bench_video.py --encode today=/tmp/base new=. --resolutions 360p --minutes 20 --gops 2

``--plan`` answers a different question: what does the loader pay for planning a record again (``plan_record``:
headers, container metadata, tokenising) instead of receiving the cost pass's plan, against the whole
``encode_record``; and how large a pickled plan is (what shipping plans to the workers would cost).

Clips are cached under ``benchmarks/.cache/`` (built by remuxing one encoded 16 s segment, so an hour-long clip
costs seconds to make; decoding cost per frame is that of the segment's content).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESOLUTIONS = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}
SOURCE_FPS = 25
SEGMENT_S = 16  # a multiple of every keyframe interval used, so GOPs stay regular across the seams
SAMPLING = {"fps": 1.0, "max_frames": 180, "min_frames": 4}
MAX_VISUAL_TOKENS, PATCH, MERGE = 10240, 14, 2


# ---------------------------------------------------------------------------------------------------------------
# clip generation
# ---------------------------------------------------------------------------------------------------------------
def _texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour texture (blobs plus fine grain), 2x the frame so it can scroll."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(coarse).resize((2 * width, 2 * height), Image.Resampling.BICUBIC))
    grain = rng.integers(-12, 13, big.shape, dtype=np.int16)
    return np.clip(big.astype(np.int16) + grain, 0, 255).astype(np.uint8)


def _encode_segment(path: Path, width: int, height: int, gop_s: int) -> None:
    """SEGMENT_S seconds of scrolling texture with a moving square, x264 veryfast CRF 23, fixed GOP."""
    import av

    tex = _texture(width, height)
    n, gop = SEGMENT_S * SOURCE_FPS, gop_s * SOURCE_FPS
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(SOURCE_FPS))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {
            "preset": "veryfast",
            "crf": "23",
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
        }
        side = height // 6
        for i in range(n):
            y, x = (3 * i) % height, (5 * i) % width
            frame = tex[y : y + height, x : x + width].copy()
            sx = (i * 12) % (width - side)
            frame[height // 2 - side // 2 : height // 2 + side // 2, sx : sx + side] = (230, 40, 40)
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = i
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _remux_repeat(segment: Path, path: Path, repeats: int) -> None:
    """Concatenate ``repeats`` copies of ``segment`` by stream copy, shifting timestamps (no re-encode)."""
    import av

    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(segment)) as src, av.open(str(tmp), "w") as out:
        ins = src.streams.video[0]
        outs = out.add_stream_from_template(ins)
        shift = None
        for k in range(repeats):
            src.seek(0)
            for pkt in src.demux(ins):
                if pkt.dts is None:
                    continue  # the demuxer's flush packet
                if shift is None:
                    shift = round(SEGMENT_S / float(ins.time_base))
                pkt.pts += k * shift
                pkt.dts += k * shift
                pkt.stream = outs
                out.mux(pkt)
    os.replace(tmp, path)


def make_clip(res: str, minutes: float, gop_s: int) -> Path:
    """Cached clip ``<res>_<minutes>min_gop<gop>s.mp4``; generated on first use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    width, height = RESOLUTIONS[res]
    path = CACHE / f"{res}_{minutes:g}min_gop{gop_s}s.mp4"
    if path.exists():
        return path
    segment = CACHE / f"segment_{res}_gop{gop_s}s.mp4"
    if not segment.exists():
        print(f"  encoding {segment.name} ...", file=sys.stderr, flush=True)
        _encode_segment(segment, width, height, gop_s)
    repeats = max(1, math.ceil(minutes * 60 / SEGMENT_S))
    print(f"  remuxing {path.name} ({repeats} x {SEGMENT_S}s) ...", file=sys.stderr, flush=True)
    _remux_repeat(segment, path, repeats)
    return path


# ---------------------------------------------------------------------------------------------------------------
# the plan shared by every method (computed in the parent, so children do not import transformers)
# ---------------------------------------------------------------------------------------------------------------
def plan(path: Path) -> dict:
    """Sampled frames, final target size and decode-time size of one clip, as ``encode_record`` derives them."""
    from videollama3_train.data import media
    from videollama3_train.data.vision import processor_budgets, processor_frame_size

    info = media.probe_video(path)
    sample = media.sample_frames(info, **SAMPLING)
    budgets = processor_budgets(
        patch_size=PATCH,
        image_merge_size=1,
        video_merge_size=MERGE,
        max_visual_tokens=MAX_VISUAL_TOKENS,
        min_tokens_per_item=16,
        max_tokens_per_item=16384,
    )
    th, tw = processor_frame_size(
        info.height, info.width, len(sample.times), merge_size=MERGE, budgets=budgets
    )
    # encode.py's decode-time size (decode_scale): the smallest even size of the same aspect that still covers the
    # target, used when the target is under half the native size.
    scale = max(th / info.height, tw / info.width)
    decode = None
    if scale < 0.5:
        decode = (
            min(info.height, max(th, 2 * math.ceil(info.height * scale / 2))),
            min(info.width, max(tw, 2 * math.ceil(info.width * scale / 2))),
        )
    return {
        "path": str(path),
        "frames": len(sample.times),
        "times": sample.times,
        "target": [th, tw],
        "decode": decode,
        "native": [info.height, info.width],
        "duration": info.duration,
        "tokens_per_frame": th * tw // (PATCH * MERGE) ** 2,
        # the processor's per-frame pixel budget: what the target was sized under, so a cache entry stored under
        # it is never smaller than the target
        "cap": budgets["video_max_pixels"] // len(sample.times),
    }


# ---------------------------------------------------------------------------------------------------------------
# --plan: re-planning a record vs encoding it
# ---------------------------------------------------------------------------------------------------------------
def plan_vs_encode(clips: list[Path], reps: int = 5) -> None:
    """Median seconds of ``plan_record``, ``encode_record`` and ``encode_record(plan=...)`` per record, and the
    pickled size of a plan, for a 1080p JPEG and each clip (tiny tokenizer: tokenising is a small share)."""
    import pickle
    import statistics

    from PIL import Image

    from videollama3_train.data.config import EncodeConfig
    from videollama3_train.data.encode import encode_record, plan_record
    from videollama3_train.model.tokenizer import build_processor, build_tiny_tokenizer

    proc = build_processor(build_tiny_tokenizer())
    cfg = EncodeConfig(max_visual_tokens=MAX_VISUAL_TOKENS, video_merge_size=MERGE, **SAMPLING)
    image = CACHE / "image_1080p.jpg"
    if not image.exists():
        Image.fromarray(_texture(1920, 1080)[:1080, :1920]).save(image, quality=90)
    conv = [{"from": "human", "value": "What happens?"}, {"from": "gpt", "value": "Something moves."}]
    records = [("image 1080p JPEG", {"image": image.name, "conversations": conv})]
    records += [(c.stem, {"video": c.name, "conversations": conv}) for c in clips]

    def median_s(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    kw = dict(data_root=CACHE, processor=proc, config=cfg)
    print(
        "\n| record | plan_record ms | encode_record ms | encode_record(plan=) ms | plan share | pickled plan |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, rec in records:
        p = plan_record(rec, **kw)
        t_plan = median_s(lambda rec=rec: plan_record(rec, **kw))
        t_enc = median_s(lambda rec=rec: encode_record(rec, **kw))
        t_reuse = median_s(lambda rec=rec, p=p: encode_record(rec, plan=p, **kw))
        size = len(pickle.dumps(p))
        print(
            f"| {name} | {t_plan * 1e3:.1f} | {t_enc * 1e3:.1f} | {t_reuse * 1e3:.1f} | {t_plan / t_enc:.1%} "
            f"| {size / 1024:.1f} KiB |"
        )


# ---------------------------------------------------------------------------------------------------------------
# methods (run inside a child process)
# ---------------------------------------------------------------------------------------------------------------
def _pil_resize(frames: list[np.ndarray] | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = size
    out = np.empty((len(frames), h, w, 3), np.uint8)
    for i, f in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC))
    return out


def run_official(p: dict, mem_limit_gb: float) -> dict:
    import av

    h, w = p["native"]
    duration = p["duration"]
    n_fps = max(1, int(math.floor(duration * SAMPLING["fps"] + 1e-6)))
    projected_gb = n_fps * h * w * 3 / 2**30
    faithful = projected_gb <= mem_limit_gb
    n_keep = min(n_fps, SAMPLING["max_frames"])
    keep_idx = set(np.linspace(0, n_fps - 1, n_keep).round().astype(int).tolist())
    kept: list[np.ndarray] = []
    index = 0  # index of the next 1-fps frame
    next_t = 0.0
    with av.open(p["path"]) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        tb = float(s.time_base)
        start = None
        for frame in c.decode(s):  # every frame of the clip is decoded
            t = frame.pts * tb
            start = t if start is None else start
            if t - start + 1e-6 < next_t or index >= n_fps:
                continue
            if faithful or index in keep_idx:
                kept.append(
                    frame.to_ndarray(format="rgb24")
                )  # native resolution, as the ffmpeg pipe delivers
            index += 1
            next_t = index / SAMPLING["fps"]
    if faithful:  # subsample to max_frames afterwards, as the official code does
        sel = np.linspace(0, len(kept) - 1, min(len(kept), SAMPLING["max_frames"])).round().astype(int)
        kept = [kept[i] for i in sel]
    out = _pil_resize(kept, tuple(p["target"]))
    return {"frames": len(out), "faithful": faithful, "projected_gb": projected_gb}


def run_ours(p: dict, prescale: bool = False) -> dict:
    from videollama3_train.data import media

    info = media.probe_video(p["path"])
    times = media.sample_frames(info, **SAMPLING).times
    frames, _ = media.decode_video(
        p["path"], times, size=tuple(p["target"]), info=info, prescale=p["decode"] if prescale else None
    )
    return {"frames": len(frames), "out_mb": frames.nbytes / 2**20}


def run_encode(p: dict, encode: bool) -> dict:
    """``encode_record`` of one record holding the clip (tiny processor, the target above, no token compression);
    with ``encode=False`` only what precedes it (imports, processor): the baseline of this method."""
    from videollama3_train.data.config import EncodeConfig
    from videollama3_train.data.encode import encode_record
    from videollama3_train.model.tokenizer import build_processor, build_tiny_tokenizer

    processor = build_processor(build_tiny_tokenizer())
    config = EncodeConfig(
        fps=SAMPLING["fps"],
        max_frames=SAMPLING["max_frames"],
        min_frames=SAMPLING["min_frames"],
        max_visual_tokens=MAX_VISUAL_TOKENS,
        video_merge_size=MERGE,
        use_token_compression=False,
        max_length=MAX_VISUAL_TOKENS + 64,
    )
    if not encode:
        return {"frames": 0}
    path = Path(p["path"])
    record = {
        "video": [path.name],
        "conversations": [{"from": "human", "value": "<video>\nQ"}, {"from": "gpt", "value": "A"}],
    }
    sample = encode_record(record, data_root=path.parent, processor=processor, config=config)
    pv = sample["pixel_values_videos"]
    return {"frames": int(sample["video_grid_thw"][0, 0]), "out_mb": pv.numel() * pv.element_size() / 2**20}


def encode_peaks(clips: list[Path], trees: dict[str, str]) -> None:
    """Peak RSS of ``encode_record`` on each clip under each code tree (``PYTHONPATH``), against the float32
    pixels it returns: what encoding holds beyond its output."""
    print("\n| clip | code | seconds | peak RSS - base MB | out MB (float32 pixels) | above output MB |")
    print("|---|---|---:|---:|---:|---:|")
    for clip in clips:
        p = {"path": str(clip)}
        for name, tree in trees.items():
            base = measure("encode-base", p, "", tree)
            r = measure("encode", p, "", tree)
            over = r["rss_mb"] - base["rss_mb"]
            print(
                f"| {clip.stem} | {name} | {r['seconds']:.2f} | {over:.0f} | {r['out_mb']:.1f} "
                f"| {over - r['out_mb']:.0f} |",
                flush=True,
            )


def run_cache(p: dict, cache_dir: str) -> dict:
    from videollama3_train.data import frame_cache

    got = frame_cache.lookup_frames(cache_dir, p["path"], **SAMPLING, size=tuple(p["target"]))
    if got is None:
        raise RuntimeError("cache miss: the entry should have been built by the parent")
    return {"frames": len(got[0])}


def run_prepare(p: dict, cache_dir: str) -> dict:
    from videollama3_train.data import frame_cache

    cap = p["cap"]
    counts = frame_cache.build_frame_cache(
        [(p["path"], None, None)],
        cache_dir,
        **SAMPLING,
        max_pixels_per_frame=cap,
        overwrite=True,
        progress=False,
    )
    if counts["written"] != 1:
        raise RuntimeError(f"prepare failed: {counts}")
    return {"frames": p["frames"]}


def peak_rss_mb() -> float:
    """This process's peak resident set, from ``VmHWM``.

    Not ``ru_maxrss``: Linux carries it across ``execve`` from the pre-exec image, and ``subprocess`` may vfork
    from the (large) parent, so a fresh child would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # non-Linux fallback (KiB on Linux)


def child(method: str, plan_json: str, arg: str) -> None:
    """Entry of a measurement subprocess: prints one JSON line with seconds and peak RSS."""
    import av  # noqa: F401 -- imported before timing, like a warm data worker
    import torch

    from videollama3_train.data import frame_cache, media  # noqa: F401

    torch.set_num_threads(1)  # as in a data worker (one thread per worker)

    p = json.loads(plan_json)
    t0 = time.perf_counter()
    if method == "official":
        res = run_official(p, float(arg))
    elif method == "ours":
        res = run_ours(p)
    elif method == "ours-scaled":
        res = run_ours(p, prescale=True)
    elif method == "cache":
        res = run_cache(p, arg)
    elif method == "prepare":
        res = run_prepare(p, arg)
    elif method in ("encode", "encode-base"):
        res = run_encode(p, method == "encode")
    elif method == "base":
        res = {"frames": 0}
    else:
        raise SystemExit(f"unknown method {method}")
    res["seconds"] = time.perf_counter() - t0
    res["rss_mb"] = peak_rss_mb()
    print(json.dumps(res))


def measure(method: str, p: dict, arg: str, tree: str | None = None) -> dict:
    """One child measurement; ``tree``: import ``videollama3_train`` from there (``PYTHONPATH``)."""
    env = None if tree is None else {**os.environ, "PYTHONPATH": tree, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, json.dumps(p), arg],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{method} on {p['path']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------
def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")
    import av

    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, PyAV {av.__version__} "
        f"(FFmpeg {av.ffmpeg_version_info}), {time.strftime('%Y-%m-%d')}"
    )


def compare_formats(clip: Path) -> None:
    """Cache entry size, write and read time per codec, on one clip's sampled frames at their stored size."""
    import tempfile

    from videollama3_train.data import frame_cache, media

    p = plan(clip)
    info = media.probe_video(clip)
    times = media.sample_frame_times(info, **SAMPLING)
    size = frame_cache.stored_size(info.height, info.width, p["cap"])
    frames, stamps = media.decode_video(clip, times, size=size, info=info)
    print(f"\n{clip.name}: {len(frames)} frames stored at {size[1]}x{size[0]}")
    print("| codec | MB per entry | KB per frame | write s | read s (stored size) | read s (half size) |")
    print("|---|---:|---:|---:|---:|---:|")
    half = (size[0] // 2, size[1] // 2)
    with tempfile.TemporaryDirectory(dir=CACHE) as d:
        for codec in frame_cache.CODECS:
            t0 = time.perf_counter()
            path = frame_cache.write_cached_frames(d, "ab" * 32, frames, stamps, info, codec=codec)
            write_s = time.perf_counter() - t0
            reads = []
            for s in (None, half):
                best = math.inf
                for _ in range(3):  # best of 3: the page cache is warm after the first, as in training
                    t0 = time.perf_counter()
                    frame_cache.read_cached_frames(d, "ab" * 32, size=s)
                    best = min(best, time.perf_counter() - t0)
                reads.append(best)
            mb = path.stat().st_size / 2**20
            print(
                f"| {codec} | {mb:.1f} | {mb * 1024 / len(frames):.0f} | {write_s:.2f} | {reads[0]:.3f} "
                f"| {reads[1]:.3f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "PLAN", "ARG"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="720p only, 1 and 10 minute clips, GOP 2 s and 8 s")
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 10])
    ap.add_argument("--resolutions", nargs="+", default=["720p", "1080p"], choices=list(RESOLUTIONS))
    ap.add_argument("--gops", type=int, nargs="+", default=[2, 8], help="keyframe intervals in seconds")
    ap.add_argument("--formats", action="store_true", help="only compare cache codecs (size, write, read)")
    ap.add_argument("--official-mem-gb", type=float, default=6.0, help="above this, official keeps only 180")
    ap.add_argument("--plan", action="store_true", help="only time plan_record against encode_record")
    ap.add_argument(
        "--encode",
        nargs="*",
        metavar="NAME=TREE",
        help="only the peak RSS of encode_record, under each code tree (e.g. today=/tmp/base new=.)",
    )
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.quick:
        args.resolutions, args.minutes = ["720p"], [1, 10]

    print(f"machine: {machine()}", flush=True)
    if args.plan:
        plan_vs_encode([make_clip(r, m, args.gops[0]) for r in args.resolutions for m in args.minutes])
        return
    if args.encode is not None:
        trees = dict(t.split("=", 1) for t in args.encode) or {"new": str(HERE.parent)}
        trees = {k: str(Path(v).resolve()) for k, v in trees.items()}
        clips = [make_clip(r, m, g) for r in args.resolutions for m in args.minutes for g in args.gops]
        encode_peaks(clips, trees)
        return
    if args.formats:
        for res in args.resolutions:
            compare_formats(make_clip(res, args.minutes[0], args.gops[0]))
        return
    base = measure("base", {"path": ""}, "")
    cache_dir = str(CACHE / "frame_cache")
    rows = []
    for res in args.resolutions:
        for minutes in args.minutes:
            for gop in args.gops:
                clip = make_clip(res, minutes, gop)
                p = plan(clip)
                name = f"{res} {minutes:g} min, GOP {gop} s"
                print(f"{name}: {p['frames']} frames -> {p['target'][1]}x{p['target'][0]}", file=sys.stderr)
                results = {
                    "official": measure("official", p, str(args.official_mem_gb)),
                    "ours": measure("ours", p, ""),
                    "ours-scaled": measure("ours-scaled", p, ""),
                    "prepare": measure("prepare", p, cache_dir),
                }
                results["cache"] = measure("cache", p, cache_dir)
                for method, r in results.items():
                    rows.append((name, method, r, results["official"]["seconds"]))
                    print(
                        f"  {method:9s} {r['seconds']:8.2f} s {r['rss_mb']:8.0f} MB",
                        file=sys.stderr,
                        flush=True,
                    )

    print("\n| clip | method | seconds | peak RSS MB | RSS - base MB | out MB | speedup vs official |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, method, r, ref in rows:
        rss = f"{r['rss_mb']:.0f}"
        if method == "official" and not r.get("faithful", True):
            rss += f"* (faithful: >= {r['projected_gb'] * 1024:.0f})"
        label = method + (" (once per dataset)" if method == "prepare" else "")
        out = f"{r['out_mb']:.1f}" if "out_mb" in r else "-"
        print(
            f"| {name} | {label} | {r['seconds']:.2f} | {rss} | {r['rss_mb'] - base['rss_mb']:.0f} | {out} "
            f"| {ref / r['seconds']:.1f}x |"
        )
    print(
        f"\nbase: a child that only imports numpy, PyAV, torch and our data modules peaks at {base['rss_mb']:.0f} MB. "
        "Target: fps 1, <= 180 frames, 10240 visual tokens per sample, merge 2."
    )


if __name__ == "__main__":
    main()

"""B8: how long a large official-format dataset takes to start training, today's code beside the new.

For each size N a dataset of the stated mix is generated (``startup_data.py``: 50% single JPEGs 200-1200 px a
side, 5% 30-s 320x240 H.264 clips, 45% text-only; every record its own media path, symlinked onto a small pool;
under ``--cache-dir``, never in the repository). Each measurement runs in a fresh subprocess that imports one
code tree through ``PYTHONPATH`` (``--base NAME=DIR``: a worktree of an older commit, several allowed; the new:
this checkout), the trees interleaved phase by phase so all see the same machine load:

* ``arrow``: ``load_annotations`` (annotations -> memory-mapped Arrow) into a fresh cache;
* ``cost``: the cost pre-pass (``compute_costs`` with ``_cost_of``, ``--workers`` processes, no cache): records/s
  (wall), and records per CPU-second of the pass's processes (what one core does, robust to a shared machine's
  load); and per modality, 1 process on the first records of each kind (records per CPU-second);
  the tables' token and patch columns must be equal (checked here, the run stops otherwise);
* ``plan``: one epoch's plan (``packing.build_epoch_plan``, the packer's public entry point, as each tree has it);
* ``train``: ``train model=tiny stage=multitask_sft trainer.max_steps=1`` on the dataset, cold (no cost table,
  fresh Arrow cache) and warm (both cached): seconds to the first optimizer step (the train progress bar's
  first step) and to the process exit; the process tree is sampled every 0.2 s for the peak RSS (and RssAnon:
  the process's own pages, not a memory-mapped file's) of the main process, of the loader workers (descendants
  alive at the first step) and of the cost pass's workers (``model=tiny``: 1 cost process, the main one, and 1
  loader worker); a run whose main process passes ``--rss-cap-mb`` is killed and reported so (shared machine).

    git worktree add /tmp/base-today 674b7ae; git worktree add /tmp/base-issue 992ef60
    nice -n 5 python benchmarks/bench_startup.py --base issue=/tmp/base-issue:cost --base today=/tmp/base-today \
        --sizes 10000 100000
    nice -n 5 python benchmarks/bench_startup.py --base today=/tmp/base-today --sizes 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PER_MODALITY = {"image": 1500, "video": 150, "text": 1500}  # records timed alone per kind (1 process)


# ---------------------------------------------------------------------------------------------------------------
# children (run under one code tree)
# ---------------------------------------------------------------------------------------------------------------
def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the pool's workers, once joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _processor():
    from videollama3_train.model.tokenizer import build_processor, build_tiny_tokenizer

    return build_processor(build_tiny_tokenizer())


def _encode_config():
    from videollama3_train.data.config import EncodeConfig

    # multitask_sft's cost-relevant settings (configs/stage/multitask_sft.yaml)
    return EncodeConfig(image_merge_size=1, video_merge_size=2, use_token_compression=True)


def child_arrow(ann: str, out: str) -> dict:
    from videollama3_train.data.annotations import load_annotations

    with tempfile.TemporaryDirectory(dir=out) as cache:
        t = time.perf_counter()
        ds = load_annotations(ann, cache_dir=cache)
        return {"seconds": time.perf_counter() - t, "records": len(ds)}


def _modality_rows(ds, counts: dict[str, int]) -> dict[str, list[dict]]:
    """The first ``counts[kind]`` records of each kind (image / video / text-only) as the cost pass reads them."""
    kinds: dict[str, list[int]] = {k: [] for k in counts}
    for i, rec in enumerate(ds.select(range(min(len(ds), 200_000)))["record"]):
        k = "image" if '"image"' in rec else "video" if '"video"' in rec else "text"
        if len(kinds[k]) < counts[k]:
            kinds[k].append(i)
    return {k: [{"record": r} for r in ds.select(idx)["record"]] for k, idx in kinds.items()}


def child_modality(ann: str, out: str, scale: int) -> dict:
    """Records per CPU-second per kind, 1 process, ``scale`` x the cost phase's counts (a steadier figure)."""
    from functools import partial

    from videollama3_train.data.annotations import load_annotations
    from videollama3_train.data.build import _cost_of

    processor, enc = _processor(), _encode_config()
    with tempfile.TemporaryDirectory(dir=out) as cache:
        ds = load_annotations(ann, cache_dir=cache)
        fn = partial(_cost_of, root=str(Path(ann).parent), processor=processor, config=enc, dataset="b8")
        rows = _modality_rows(ds, {k: v * scale for k, v in PER_MODALITY.items()})
        for r in rows["text"][:50]:
            fn(r)  # warm: imports, the token counter's first words
        res = {}
        for k, rs in rows.items():
            t = time.process_time()
            for r in rs:
                fn(r)
            res[k] = len(rs) / (time.process_time() - t)
    return {"modality_per_core": res, "records": {k: len(v) for k, v in rows.items()}}


def child_cost(ann: str, out: str, workers: int, table: str) -> dict:
    from functools import partial

    import numpy as np

    from videollama3_train.data.annotations import load_annotations
    from videollama3_train.data.build import _cost_of
    from videollama3_train.data.costs import compute_costs

    root = str(Path(ann).parent)
    processor, enc = _processor(), _encode_config()
    with tempfile.TemporaryDirectory(dir=out) as cache:
        ds = load_annotations(ann, cache_dir=cache)
        fn = partial(_cost_of, root=root, processor=processor, config=enc, dataset="b8")
        # per modality, 1 process: the first records of each kind; records per CPU-second (this process's CPU
        # time): what a core does, whatever else runs on the machine
        modality = {}
        for k, rows in _modality_rows(ds, PER_MODALITY).items():
            t = time.process_time()
            for r in rows:
                fn(r)
            modality[k] = len(rows) / (time.process_time() - t)
        t, cpu = time.perf_counter(), _cpu_seconds()
        result = compute_costs(ds, fn, num_workers=workers, progress=False)
        seconds, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    np.save(table, result.costs)
    return {
        "seconds": seconds,
        "records_per_s": len(ds) / seconds,
        "per_core": len(ds) / seconds / max(workers, 1),
        "cpu_seconds": cpu,
        "per_cpu_second": len(ds) / cpu,
        "modality_per_core": modality,
        "failures": len(result.failures),
    }


def child_plan(ann: str, table: str) -> dict:
    import inspect

    import numpy as np

    from videollama3_train.data.config import DataConfig
    from videollama3_train.data.packing import build_epoch_plan

    dcfg = DataConfig(path=ann, root=str(Path(ann).parent))
    specs = list(dcfg.resolved_datasets().values())
    costs = [np.load(table)]
    # one row per step; the packer's keyword for it changed with the vectorised packer (rows_per_step)
    new = "rows_per_step" in inspect.signature(build_epoch_plan).parameters
    grouping = {"rows_per_step": 1} if new else {"num_ranks": 1, "grad_accum": 1, "drop_last": False}
    t = time.perf_counter()
    plan = build_epoch_plan(
        specs,
        costs,
        seed=0,
        epoch=0,
        max_tokens=dcfg.max_tokens,
        max_patches=dcfg.max_patches,
        buffer_size=dcfg.buffer_size,
        **grouping,
    )
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "samples_per_s": len(costs[0]) / seconds, "steps": int(plan.steps)}


def child(args: list[str]) -> None:
    phase, rest = args[0], args[1:]
    if phase == "arrow":
        res = child_arrow(*rest)
    elif phase == "modality":
        res = child_modality(rest[0], rest[1], int(rest[2]))
    elif phase == "cost":
        res = child_cost(rest[0], rest[1], int(rest[2]), rest[3])
    else:
        res = child_plan(*rest)
    res["peak_rss_mb"] = _peak_mb()
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------------------
def _env(tree: Path, hf_cache: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update(TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    if hf_cache:
        env["HF_DATASETS_CACHE"] = hf_cache
    return env


def run_child(tree: Path, *args: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tree), cwd=tree)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child {args[0]} under {tree} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _rss(pid: int) -> tuple[float, float]:
    """``(RSS, RssAnon)`` of a process in MB: all its resident pages, and those that are its own (heap, not the
    shared libraries' or a memory-mapped file's pages, which the page cache holds and any process may share)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out.get("VmRSS", 0.0), out.get("RssAnon", 0.0)


def _tree_rss(proc) -> tuple[tuple[float, float], dict[int, tuple[float, float]]]:
    """:func:`_rss` of ``proc`` and of each of its descendants (by pid) but multiprocessing's resource tracker."""
    import psutil

    try:
        p = psutil.Process(proc.pid)
        kids = p.children(recursive=True)
        main = _rss(proc.pid)
    except (psutil.Error, OSError):
        return (0.0, 0.0), {}
    out = {}
    for k in kids:
        with contextlib.suppress(
            psutil.Error, OSError
        ):  # a worker that exited between the listing and the read
            if "resource_tracker" not in " ".join(k.cmdline()):
                out[k.pid] = _rss(k.pid)
    return main, out


def run_train(
    tree: Path,
    ann: Path,
    out: Path,
    hf: str,
    cold: bool,
    rss_cap_mb: float | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    """``train`` to one optimizer step with the Arrow cache ``hf``; cold removes the cost tables first (and is
    given a fresh ``hf``), warm finds both where its cold run left them.

    Peak RSS is sampled every 0.2 s per process: the main process; the loader workers (its descendants alive when
    the first step is seen, the cost pass's workers having exited by then); the cost pass's workers (the others).
    ``rss_cap_mb``: the run is killed when the main process passes it (the machine is shared), and reported so.
    """
    if cold:
        for f in ann.parent.glob(f".{ann.name}.*"):
            f.unlink()
    run_dir = tempfile.mkdtemp(dir=out)
    cmd = [sys.executable, "-m", "videollama3_train.train", "model=tiny", "stage=multitask_sft"]
    cmd += [
        "trainer.max_steps=1",
        "data=file",
        f"data.path={ann}",
        f"data.root={ann.parent}",
        f"output_dir={run_dir}",
        *extra,
    ]
    log_path = Path(run_dir + ".log")
    t0 = time.perf_counter()
    first_step, peak_main, peak_main_anon, capped = None, 0.0, 0.0, None
    peaks: dict[int, tuple[float, float]] = {}  # descendant pid -> peak (RSS, RssAnon) (MB)
    loader: set[int] = set()  # descendants alive at the first step
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(tree, hf), cwd=tree)
        while proc.poll() is None:
            (main, main_anon), kids = _tree_rss(proc)
            peak_main, peak_main_anon = max(peak_main, main), max(peak_main_anon, main_anon)
            for pid, (rss, anon) in kids.items():
                old = peaks.get(pid, (0.0, 0.0))
                peaks[pid] = (max(old[0], rss), max(old[1], anon))
            if first_step is None and _stepped(log_path):
                first_step = time.perf_counter() - t0
                loader = set(kids)
            if rss_cap_mb is not None and main > rss_cap_mb:
                capped = time.perf_counter() - t0
                _kill_tree(proc)
                break
            time.sleep(0.2)
        proc.wait()
    total = time.perf_counter() - t0
    if first_step is None and capped is None and _stepped(log_path):
        first_step = total
    text = log_path.read_text()
    if proc.returncode != 0 and capped is None:
        raise RuntimeError(f"train under {tree} failed:\n{text[-4000:]}")
    return {
        "first_step_s": first_step,
        "exit_s": total,
        "main_rss_mb": peak_main,
        "main_anon_mb": peak_main_anon,
        "worker_rss_mb": max([peaks[p][0] for p in loader if p in peaks], default=0.0),
        "worker_anon_mb": max([peaks[p][1] for p in loader if p in peaks], default=0.0),
        "loader_workers": len(loader),
        "cost_worker_rss_mb": max([v[0] for p, v in peaks.items() if p not in loader], default=0.0),
        "killed_over_rss_cap_at_s": capped,
        "log": str(log_path),
    }


def _kill_tree(proc) -> None:
    """SIGKILL ``proc`` and its descendants (the run this benchmark started)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        p = psutil.Process(proc.pid)
        for k in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                k.kill()
        p.kill()


def _stepped(log_path: Path) -> bool:
    """Whether the train log shows the first optimizer step."""
    text = log_path.read_text(errors="replace")
    return "| 1/1 [" in text  # the train progress bar at its one step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument(
        "--base",
        action="append",
        default=[],
        metavar="NAME=DIR[:PHASE,...]",
        help="a worktree of older code (git worktree add /tmp/base-today 674b7ae), named; repeat for several; "
        "PHASEs: the phases it runs (default all), e.g. issue=/tmp/base-issue:cost",
    )
    ap.add_argument(
        "--rss-cap-mb", type=float, default=3000, help="kill a train run whose main process passes it"
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--train-args", nargs="*", default=[], help="overrides added to the train runs")
    ap.add_argument(
        "--modality-scale", type=int, default=4, help="modality phase: x the cost phase's records"
    )
    ap.add_argument("--workers", type=int, default=2, help="cost-pass processes (= cores used)")
    ap.add_argument("--only", nargs="+", default=["arrow", "cost", "plan", "train"])
    ap.add_argument("--new-only", action="store_true", help="measure the new code only (large sizes)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/b8"))
    ap.add_argument("--json", type=Path, default=HERE / "results" / "B8_startup.jsonl")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    sys.path.insert(0, str(HERE))
    from startup_data import make_dataset

    trees, phases_of = {}, {}
    for spec in [] if args.new_only else args.base:
        name, _, rest = spec.partition("=")
        tree, _, phases = rest.partition(":")
        trees[name or "today"] = Path(tree)
        phases_of[name or "today"] = set(phases.split(",")) if phases else None
    trees["new"] = REPO
    for n in args.sizes:
        t = time.perf_counter()
        ann, counts = make_dataset(args.cache_dir, n)
        print(f"N={n}: {counts}, generated/reused in {time.perf_counter() - t:.0f} s", flush=True)
        work = Path(tempfile.mkdtemp(dir=args.cache_dir, prefix="work"))
        rows: dict[str, dict] = {k: {"code": k, "N": n, "mix": counts} for k in trees}
        for phase in args.only:
            for name, tree in trees.items():
                if phases_of.get(name) is not None and phase not in phases_of[name]:
                    continue
                table = str(work / f"costs_{name}.npy")
                if phase == "arrow":
                    rows[name]["arrow"] = run_child(tree, "arrow", str(ann), str(work))
                elif phase == "modality":  # interleaved rounds: tree A, tree B, tree A, ...
                    rows[name].setdefault("modality", []).append(
                        run_child(tree, "modality", str(ann), str(work), str(args.modality_scale))
                    )
                elif phase == "cost":
                    rows[name]["cost"] = run_child(
                        tree, "cost", str(ann), str(work), str(args.workers), table
                    )
                elif phase == "plan":
                    if not Path(table).exists():
                        rows[name]["cost"] = run_child(
                            tree, "cost", str(ann), str(work), str(args.workers), table
                        )
                    rows[name]["plan"] = run_child(tree, "plan", str(ann), table)
                elif phase == "train":
                    extra = tuple(args.train_args)
                    rows[name]["train_args"] = list(extra)
                    hf = tempfile.mkdtemp(dir=work)  # this tree's Arrow cache: filled cold, read warm
                    rows[name]["train_cold"] = run_train(tree, ann, work, hf, True, args.rss_cap_mb, extra)
                    rows[name]["train_warm"] = run_train(tree, ann, work, hf, False, args.rss_cap_mb, extra)
                print(
                    name, phase, json.dumps(rows[name].get(phase, rows[name].get("train_warm"))), flush=True
                )
            costed = [k for k in trees if (work / f"costs_{k}.npy").exists()]
            if phase == "cost" and len(costed) > 1:
                import numpy as np

                # tokens and patches (a newer table has more columns after them)
                new = np.load(work / "costs_new.npy")[:, :2]
                for k in costed[:-1]:
                    old = np.load(work / f"costs_{k}.npy")[:, :2]
                    if not np.array_equal(old, new):
                        raise SystemExit(
                            f"N={n}: the new cost table differs from {k}'s ({(old != new).any(1).sum()} rows)"
                        )
                print(f"N={n}: cost tables equal ({len(new)} rows; {', '.join(costed)})", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            for row in rows.values():
                f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), **row}) + "\n")


if __name__ == "__main__":
    main()

"""One way in for every command: the same Hydra overrides, ``--help``, and errors that fit on a screen.

Every console script (``vl3-train``, ``vl3-pipeline``, ``vl3-doctor``, ``vl3-prepare``, ``vl3-export``,
``vl3-report``) and every ``python -m videollama3_train.<command>`` is ``main(COMMAND)`` of its module:

1. ``-h`` / ``--help`` prints what the command does, its main keys and two examples (nothing is imported or
   composed); ``--cfg [job|hydra|all]`` (``--resolve``) prints the composed config and exits; ``--config-dir DIR``
   adds a user's config folder (as ``hydra.searchpath``); ``-m`` / ``--multirun`` runs a sweep (section "Sweeps" below);
2. the arguments are Hydra overrides (``key=value``, ``group=option``, ``+data.datasets.x.path=...``), composed
   with ``configs/<command>.yaml`` by :func:`videollama3_train.config.compose` into the command's dataclass;
3. the command runs; it writes its log file itself (``<output_dir>/<command>.log``, see ``console.log_file``).

A mistake (config, paths, data, run directories: :class:`~videollama3_train.console.UserError`, the config
errors of Hydra / OmegaConf, :class:`~videollama3_train.data.errors.DataError`) ends the command with exit status 1
and one or two lines on stderr: the problem, then the fix. Under torchrun / deepspeed only rank 0 prints them; every
rank writes them to torchrun's error file (the entry point is wrapped in torch's ``record``), so the launcher's
failure summary shows the message too. ``VL3_TRACEBACK=1`` adds the traceback. Any other exception is a bug and
keeps its full traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .console import LOG_FORMAT, TRACEBACK_ENV, UserError, rank

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 1


@dataclass(frozen=True)
class Command:
    name: str  # "train": console script vl3-<name>, module videollama3_train.<name>, configs/<config>.yaml
    summary: str  # one line: what it does
    keys: str  # the main keys, one per line ("key=VALUE   meaning")
    examples: tuple[str, ...]  # two command lines
    run: Callable[[Any, list[str]], int | None]  # (config, overrides) -> exit status (None = 0)
    config: str | None = None  # configs/<config>.yaml; default: name
    needs_model_choice: bool = False  # refuse weights (init_from=...) without model=
    notes: str = ""  # extra paragraph of the help
    path_key: str = "output_dir"  # the key a bare path argument was probably meant for

    @property
    def prog(self) -> str:
        return f"vl3-{self.name}"


def render_help(cmd: Command) -> str:
    from .paths import CONFIG_DIR

    config = cmd.config or cmd.name
    lines = [
        f"usage: {cmd.prog} [KEY=VALUE ...]        (or: python -m videollama3_train.{cmd.name} [KEY=VALUE ...])",
        "",
        cmd.summary,
        "",
        "main keys:",
        *[f"  {line}" for line in cmd.keys.strip("\n").splitlines()],
        "",
        "examples:",
        *[f"  {e}" for e in cmd.examples],
        "",
    ]
    if cmd.notes:
        lines += [cmd.notes.strip("\n"), ""]
    lines += [
        f"Arguments are Hydra overrides of {CONFIG_DIR}/{config}.yaml: any key (docs/config.md lists",
        "them all), group=option for the groups stage/, model/, data/, logger/;",
        "'+data.datasets={NAME:{path:A.jsonl,root:DIR}}' adds datasets to a mixture (+ adds no other key).",
        "A misspelt key, a wrong type or a missing required value stops at start naming the key.",
        "options: -h/--help this text; --cfg [job|hydra|all] print the composed config and exit (--resolve:",
        "  interpolations resolved); --config-dir DIR (or hydra.searchpath=[DIR]) adds your own data/, stage/,",
        "  model/ YAML to the shipped ones; -m/--multirun sweeps comma lists and ranges (lr=1e-5,2e-5,",
        f"  trainer.seed=range(3)): one run directory per job under {cmd.path_key}, jobs one after another (or",
        "  hydra/launcher=NAME with its plugin installed, e.g. submitit_slurm); docs/hydra.md.",
        f"errors: one or two lines and exit status 1; {TRACEBACK_ENV}=1 adds the traceback.",
    ]
    return "\n".join(lines)


@dataclass
class Args:
    """The command line, read: Hydra overrides and Hydra's own options."""

    overrides: list[str]  # key=value / group=option / hydra.searchpath=[...] (--config-dir folded in)
    show_cfg: str | None = None  # --cfg job | hydra | all
    resolve: bool = False  # --resolve: --cfg prints interpolations resolved
    multirun: bool = False  # -m / --multirun


def main(cmd: Command, argv: Sequence[str] | None = None) -> int:
    """Run ``cmd`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(render_help(cmd))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parsed = parse_args(cmd, args)
    except UserError as e:
        return report_error(cmd, str(e))
    import warnings

    from torch.distributed.elastic.multiprocessing.errors import record

    # record's fault handler needs a real stderr; when there is none (captured output) it only warns
    warnings.filterwarnings("ignore", message="Unable to enable fault handler")
    return record(_main)(cmd, parsed)


def _main(cmd: Command, args: Args) -> int:
    try:
        _setup_console_logging()
        if args.multirun:
            return run_sweep(cmd, args)
        if args.show_cfg:
            print_config(cmd, args.overrides, args.show_cfg, args.resolve)
            return 0
        return run_command(cmd, args.overrides)
    except Exception as e:  # noqa: BLE001 - sorted below: a user's mistake is reported, a bug re-raised
        message = user_message(e)
        if message is None:
            raise
        return report_error(cmd, message)


def run_command(cmd: Command, overrides: list[str]) -> int:
    """Compose ``cmd``'s config from ``overrides`` and run it: one run (or one job of a sweep)."""
    cfg = load_config(cmd, overrides)
    status = int(cmd.run(cfg, overrides) or 0)
    _leave_process_group()
    return status


def print_config(cmd: Command, overrides: list[str], what: str, resolve: bool) -> None:
    """``--cfg job|hydra|all`` (``--resolve``): the composed config as YAML, after the same checks as a run."""
    from omegaconf import OmegaConf

    from .config import compose_node

    load_config(cmd, overrides)  # every check of a run: a mistake is reported, not printed
    node = compose_node(cmd.config or cmd.name, hydra_overrides_only(overrides), hydra_config=what != "job")
    if what in ("job", "all"):
        job = OmegaConf.masked_copy(node, [k for k in node if k != "hydra"])
        print(OmegaConf.to_yaml(job, resolve=resolve), end="")
    if what in ("hydra", "all"):
        # printed as composed: its interpolations (hydra.job.num, the run time) exist only inside a running job
        print(OmegaConf.to_yaml(OmegaConf.create({"hydra": node.hydra})), end="")


def _leave_process_group() -> None:
    """After a successful run, leave the process group together: a rank that exits with gloo still up may abort in
    its C++ teardown ("terminate called without an active exception"), which torchrun reports as a failed run."""
    import torch.distributed as dist

    from .trainer import liveness

    liveness.stop()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


CFG_KINDS = ("job", "hydra", "all")


def parse_args(cmd: Command, args: list[str]) -> Args:
    """Hydra's command line: overrides, ``-m/--multirun``, ``--cfg [job|hydra|all]``, ``--resolve``,
    ``--config-dir DIR`` (several allowed; folded into ``hydra.searchpath``)."""
    out, config_dirs = Args([]), []
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        name, eq, value = a.partition("=") if a.startswith("--") else (a, "", "")
        if a in ("-m", "--multirun"):
            out.multirun = True
        elif name in ("--cfg", "-c"):
            out.show_cfg = "job"
            if eq or (i < len(args) and "=" not in args[i] and not args[i].startswith("-")):
                out.show_cfg = value if eq else args[i]
                i += 0 if eq else 1
            if out.show_cfg not in CFG_KINDS:
                raise UserError(f"--cfg {out.show_cfg}: choose job, hydra or all")
        elif a == "--resolve":
            out.resolve = True
        elif name in ("--config-dir", "-cd"):
            if not eq and i >= len(args):
                raise UserError(f"{a} needs a folder: {a} DIR (your data/, stage/, model/ configs)")
            folder = value if eq else args[i]
            i += 0 if eq else 1
            if not os.path.isdir(folder):
                raise UserError(f"--config-dir {folder}: no such folder")
            config_dirs.append(os.path.abspath(folder))
        elif re.fullmatch(r"--local[_-]rank(=\d+)?", a):
            continue  # added by `deepspeed` / `torch.distributed.launch`; the rank comes from LOCAL_RANK
        elif a.startswith("-"):
            raise UserError(
                f"unknown option {a}: {cmd.prog} takes Hydra overrides key=value (and -h/--help, -m/--multirun, "
                f"--cfg, --resolve, --config-dir DIR); see {cmd.prog} --help"
            )
        elif "=" not in a:
            raise UserError(
                f"{a!r} is not an override: write key=value (e.g. {cmd.path_key}={a}); see {cmd.prog} --help"
            )
        else:
            out.overrides.append(a)
    if config_dirs:
        out.overrides = _fold_config_dirs(out.overrides, config_dirs)
    sweep_only = [o for o in out.overrides if o.split("=", 1)[0].lstrip("+~").startswith(SWEEP_HYDRA_KEYS)]
    if sweep_only and not out.multirun:
        raise UserError(f"{sweep_only[0]} configures a sweep: add -m (--multirun), or remove it")
    return out


def _fold_config_dirs(overrides: list[str], config_dirs: list[str]) -> list[str]:
    """``--config-dir`` as Hydra adds it: a search path entry after the shipped configs, merged with a
    ``hydra.searchpath`` override. As an override it travels wherever the overrides go (the pipeline's stages,
    the doctor's, each job of a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entries, rest = [], []
    for ov in overrides:
        if ov.split("=", 1)[0].lstrip("+") == "hydra.searchpath":
            value = OverridesParser.create().parse_override(ov.lstrip("+")).value()
            entries += [str(v) for v in (value if isinstance(value, list) else [value])]
        else:
            rest.append(ov)
    entries += [f"file://{d}" for d in config_dirs]
    quoted = ",".join("'" + e.replace("\\", "\\\\").replace("'", "\\'") + "'" for e in entries)
    return [*rest, f"hydra.searchpath=[{quoted}]"]


class _StdoutHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stdout`` is at the time of the record (captured output included)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # noqa: D102
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_console_logging() -> None:
    """INFO records on stdout (rank 0; warnings and errors on every rank), once per process."""
    root = logging.getLogger()
    if getattr(root, "_vl3_console", False):
        return
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO if rank() == 0 else logging.WARNING)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root._vl3_console = True  # type: ignore[attr-defined]
    logging.captureWarnings(True)


def load_config(cmd: Command, overrides: Sequence[str]) -> Any:
    """The command's config from ``overrides``; every mistake in them is a :class:`UserError`."""
    overrides = hydra_overrides_only(overrides, refuse=True)
    if cmd.needs_model_choice:
        from .config import missing_model_choice

        needs = missing_model_choice(overrides)
        if needs is not None:
            raise UserError(
                f"{needs} needs model=: without it the tiny preset applies (random-weight settings: "
                "trainer.lr_scale=300, lr_max=0.01, 10 epochs, 256 visual tokens).\n"
                "Add model=videollama3_2b or model=videollama3_7b (the preset of the weights; model=tiny only for "
                "a tiny checkpoint)"
            )
    from .config import compose

    try:
        return compose(cmd.config or cmd.name, overrides)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        message = explain_config_error(e)
        if message is None:
            raise
        raise UserError(message) from e


# hydra.* overrides a command takes: the config search path always; with -m the launcher and sweeper too
# (run_sweep hands them to Hydra's multirun; the jobs compose without them).
HYDRA_SEARCHPATH = "hydra.searchpath"
SWEEP_HYDRA_KEYS = ("hydra/launcher", "hydra/sweeper", "hydra.launcher.", "hydra.sweeper.")


def hydra_overrides_only(overrides: Sequence[str], refuse: bool = False) -> list[str]:
    """``overrides`` less the sweep's hydra.* settings (a job or a single run composes without them); with
    ``refuse``, any other hydra.* setting is a :class:`UserError`."""
    out = []
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key.startswith(SWEEP_HYDRA_KEYS):
            continue
        if refuse and key.startswith(("hydra.", "hydra/")) and key != HYDRA_SEARCHPATH:
            raise UserError(
                f"{key}: hydra.* settings are not used: these commands compose their config themselves and write "
                "their log to the output directory (<command>.log); hydra.searchpath (or --config-dir) and, with "
                "-m, hydra/launcher= and hydra.launcher.* are taken; remove the other hydra.* override"
            )
        out.append(ov)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Turning exceptions into one or two lines
# ----------------------------------------------------------------------------------------------------------------

# Required keys (YAML / schema "???") and how to give them.
REQUIRED_HINTS = {
    "output_dir": "add output_dir=DIR (the run directory: checkpoints, export, logs)",
    "data.path": "data=file needs data.path=ANNOTATIONS.jsonl (and data.root=MEDIA_DIR); or choose another "
    "data=<config>",
    "checkpoint": "add checkpoint=RUN_DIR (its newest complete checkpoint) or checkpoint=RUN_DIR/checkpoints/step-N",
    "output": "add output=DIR (the transformers-native directory to write)",
    "root": "add root=DIR (the folder holding one run directory per stage)",
}


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def explain_config_error(exc: BaseException) -> str | None:
    """One or two lines for an error raised while composing a config; None when it is not a config error."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        OmegaConfBaseException,
        ValidationError,
    )

    chain = _chain(exc)
    for e in chain:
        full_key = getattr(e, "full_key", None)
        if isinstance(e, MissingMandatoryValue):
            key = full_key or "?"
            return f"{key} is required: {REQUIRED_HINTS.get(key, f'add {key}=VALUE')}"
        if isinstance(e, ConfigAttributeError | ConfigKeyError) and full_key:
            return _unknown_key(full_key)
        if isinstance(e, ValidationError) and full_key:
            value = getattr(e, "value", None)
            msg = _first_line(str(e)).replace("'$VALUE'", repr(value)).replace("'$VALUE_TYPE'", "")
            return f"{full_key}: {msg}; docs/config.md gives its type and meaning"
    top = chain[0]
    if isinstance(top, MissingConfigException):
        m = re.search(r"Could not find '([^/']+)/([^']+)'", str(top))
        if m:
            group, option = m.groups()
            options = getattr(top, "options", None) or re.findall(r"^\t(\S+)$", str(top), flags=re.M)
            return f"{group}={option}: no such {group} config; choose one of {', '.join(options)}"
        return _first_line(str(top))
    if isinstance(top, OverrideParseException):
        bad = re.search(r"Error parsing override '([^']*)'", str(top))
        what = bad.group(1) if bad else "an argument"
        return f"cannot read the override {what!r}: write key=value (quote values with spaces or brackets)"
    if isinstance(top, HydraException | OmegaConfBaseException):
        return " ".join(_first_line(str(e)) for e in chain[:2] if str(e).strip())
    if isinstance(top, ValueError | TypeError):  # a schema's __post_init__ check
        return f"config: {top}"
    return None


def _unknown_key(full_key: str) -> str:
    import difflib

    from .config import COMMAND_SCHEMAS, schema_keys

    known = sorted({k for s in COMMAND_SCHEMAS.values() for k in schema_keys(s) if "<name>" not in k})
    close = difflib.get_close_matches(full_key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown key {full_key}: {hint}(docs/config.md lists every key; a run's config is its --cfg)"


def user_message(exc: BaseException) -> str | None:
    """The message of a user's mistake, or None for a bug."""
    from .data.errors import DataError

    if isinstance(exc, UserError):
        return str(exc)
    for e in _chain(exc):  # a DataError, possibly wrapped by a library that read the file (datasets)
        if isinstance(e, DataError):
            return (
                f"bad data: {e}\n"
                "docs/data_format.md describes the annotation schemas; vl3-doctor reports every bad record"
            )
    return None


def report_error(cmd: Command, message: str) -> int:
    """Print ``message`` on the reporting rank, record it in torchrun's error file, return the exit status."""
    show_traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    _write_error_file(message, traceback.format_exc() if show_traceback else message)
    if rank() == 0:
        if show_traceback:
            traceback.print_exc()
        lines = message.strip().splitlines()
        print(f"{cmd.prog}: error: {lines[0]}", *lines[1:], sep="\n", file=sys.stderr, flush=True)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(1.0)  # rank 0 reports: let it be the first failure the launcher sees
    return EXIT_USER_ERROR


def _write_error_file(message: str, callstack: str) -> None:
    """torchrun's error file (the format of torch's ``ErrorHandler.record_exception``), when launched by it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {
        "message": {
            "message": f"UserError: {message}",
            "extraInfo": {"py_callstack": callstack, "timestamp": str(int(time.time()))},
        }
    }
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


# ============================================================================================================
# Sweeps
# ============================================================================================================
# ``-m`` / ``--multirun``: Hydra's sweeps for every command, each job its own run directory.
#
#     vl3-train -m trainer.lr_llm=1e-5,2e-5 model=tiny data=sample output_dir=outputs/lr
#     -> outputs/lr/0_trainer.lr_llm=1e-05/  outputs/lr/1_trainer.lr_llm=2e-05/  outputs/lr/multirun.yaml
#
# Hydra expands the sweep (comma lists, ``range(...)``, ``choice(...)``, ``glob(...)``) and launches the jobs through
# its launcher: the basic launcher runs them one after another in this process; ``hydra/launcher=NAME`` picks an
# installed plugin's (``submitit_slurm`` of ``hydra-submitit-launcher`` submits each job to SLURM). The command's
# run-directory key (``output_dir``; ``checkpoint``/``root`` for export/report) names the sweep's folder
# (``hydra.sweep.dir``); a job's run directory is ``<number>_<swept overrides>`` under it
# (``hydra.sweep.subdir``), and the job runs exactly as the single command would with that directory: the same
# config checks, run-directory rules, logs and one-line errors (:func:`cli.run_command`).
#
# Every job's config is composed and checked before the first job starts, so a mistake in the sweep stops it at
# start in one line, not after the first job has trained. A job that fails later reports its error and the sweep
# goes on; the exit status is the worst job's.


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def plan_sweep(cmd: Command, overrides: list[str]) -> tuple[str, list[list[str]], list[str]]:
    """``(sweep folder, each job's overrides, the keys that do not vary)`` as Hydra's basic sweeper expands it."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path_key = cmd.path_key
    task = [o for o in overrides if not _key(o).startswith(("hydra.", "hydra/"))]
    parsed = OverridesParser.create().parse_overrides(task)
    folder = [o for o in parsed if o.key_or_group == path_key]
    if not folder:
        raise UserError(f"a sweep needs {path_key}=DIR: the folder holding one run directory per job")
    if folder[0].is_sweep_override():
        raise UserError(
            f"{path_key} cannot be swept: it is the sweep's folder (each job gets its own under it)"
        )
    if not any(o.is_sweep_override() for o in parsed):
        raise UserError("-m: nothing to sweep; give a key a comma list (key=a,b) or a range (key=range(1,4))")
    (jobs,) = BasicSweeper.split_arguments(parsed, None)
    fixed = [o.key_or_group for o in parsed if not o.is_sweep_override()]
    return os.path.abspath(str(folder[0].value())), jobs, fixed


def run_sweep(cmd: Command, args: Args) -> int:
    """Run the sweep of ``args``; returns the worst job's exit status."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .config import CONFIG_DIR, register_configs

    sweep_dir, jobs, fixed = plan_sweep(cmd, args.overrides)
    searchpath = [o for o in args.overrides if _key(o) == "hydra.searchpath"]
    custom_sweeper = any(_key(o).startswith("hydra/sweeper") for o in args.overrides)
    if not custom_sweeper:  # another sweeper expands the sweep its own way: its jobs are checked as they run
        for n, job in enumerate(jobs):
            job_ov = [*job, *searchpath]
            if args.show_cfg:
                print(f"# job {n}: {' '.join(job)}")
                print_config(cmd, job_ov, args.show_cfg, args.resolve)
                continue
            try:
                load_config(cmd, job_ov)
            except UserError as e:
                raise UserError(
                    f"sweep job {n} ({' '.join(o for o in job if _key(o) not in fixed)}): {e}"
                ) from e
        if args.show_cfg:
            return 0
        log.info("sweep: %d jobs under %s", len(jobs), sweep_dir)
    hydra_ov = [
        f"hydra.sweep.dir={_quote(sweep_dir)}",
        "hydra.sweep.subdir=${hydra.job.num}_${hydra.job.override_dirname}",
        # the job's folder is named by what it sweeps; the settings every job shares stay out of the name
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(_quote(k) for k in fixed)}]",
        "hydra.job.chdir=false",
        # the commands log themselves (console + <output_dir>/<command>.log) and write their own resolved config
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
        "hydra.output_subdir=null",
    ]
    task = functools.partial(run_job, cmd, tuple(searchpath))
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, job_name=cmd.name, version_base="1.3"):
            hydra = GlobalHydra.instance().hydra
            assert hydra is not None
            returns = hydra.multirun(
                config_name=cmd.config or cmd.name,
                task_function=task,
                overrides=[*args.overrides, *hydra_ov],
            )
    finally:
        GlobalHydra.instance().clear()
    statuses = [int(r.return_value or 0) for batch in returns for r in batch]
    failed = [n for n, s in enumerate(statuses) if s]
    if failed:
        log.warning("sweep: jobs %s failed (exit status %s); the others completed", failed, max(statuses))
    return max(statuses, default=0)


def run_job(cmd: Command, searchpath: tuple[str, ...], _cfg: Any) -> int:
    """One job (module level, so a launcher plugin can pickle it to another process or host): the command run as
    if typed with the job's overrides and its run directory."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    task = [o for o in hc.overrides.task if _key(o) != cmd.path_key]
    overrides = [*hydra_overrides_only(task), *searchpath, f"{cmd.path_key}={_quote(hc.runtime.output_dir)}"]
    log.info("sweep job %s: %s", hc.job.num, hc.runtime.output_dir)
    try:
        return run_command(cmd, overrides)
    except Exception as e:  # noqa: BLE001 - a user's mistake is reported and the sweep goes on; a bug re-raised
        message = user_message(e)
        if message is None:
            raise
        return report_error(cmd, f"sweep job {hc.job.num}: {message}")


def _quote(value: str) -> str:
    """A value as one Hydra override token (paths with spaces, commas or brackets)."""
    if all(c.isalnum() or c in "/._-:+" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


__all__ = [
    "EXIT_USER_ERROR",
    "Args",
    "Command",
    "explain_config_error",
    "hydra_overrides_only",
    "load_config",
    "main",
    "plan_sweep",
    "run_job",
    "run_sweep",
    "parse_args",
    "print_config",
    "render_help",
    "report_error",
    "user_message",
    "run_command",
]

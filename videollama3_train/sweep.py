"""``-m`` / ``--multirun``: Hydra's sweeps for every command, each job its own run directory.

    vl3-train -m trainer.lr_llm=1e-5,2e-5 model=tiny data=sample output_dir=outputs/lr
    -> outputs/lr/0_trainer.lr_llm=1e-05/  outputs/lr/1_trainer.lr_llm=2e-05/  outputs/lr/multirun.yaml

Hydra expands the sweep (comma lists, ``range(...)``, ``choice(...)``, ``glob(...)``) and launches the jobs through
its launcher: the basic launcher runs them one after another in this process; ``hydra/launcher=NAME`` picks an
installed plugin's (``submitit_slurm`` of ``hydra-submitit-launcher`` submits each job to SLURM). The command's
run-directory key (``output_dir``; ``checkpoint``/``root`` for export/report) names the sweep's folder
(``hydra.sweep.dir``); a job's run directory is ``<number>_<swept overrides>`` under it
(``hydra.sweep.subdir``), and the job runs exactly as the single command would with that directory: the same
config checks, run-directory rules, logs and one-line errors (:func:`cli.run_command`).

Every job's config is composed and checked before the first job starts, so a mistake in the sweep stops it at
start in one line, not after the first job has trained. A job that fails later reports its error and the sweep
goes on; the exit status is the worst job's.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any

from .cli import SWEEP_HYDRA_KEYS, Args, Command, hydra_overrides_only, load_config, print_config, run_command
from .console import UserError

log = logging.getLogger(__name__)


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
    task = functools.partial(run_job, cmd.name, cmd.path_key, tuple(searchpath))
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


def run_job(command: str, path_key: str, searchpath: tuple[str, ...], _cfg: Any) -> int:
    """One job (module level, so a launcher plugin can pickle it to another process or host): the command run as
    if typed with the job's overrides and its run directory."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    task = [o for o in hc.overrides.task if _key(o) != path_key]
    overrides = [*hydra_overrides_only(task), *searchpath, f"{path_key}={_quote(hc.runtime.output_dir)}"]
    cmd = importlib.import_module(f"videollama3_train.{command}").COMMAND
    log.info("sweep job %s: %s", hc.job.num, hc.runtime.output_dir)
    try:
        return run_command(cmd, overrides)
    except Exception as e:  # noqa: BLE001 - a user's mistake is reported and the sweep goes on; a bug re-raised
        from .cli import report_error, user_message

        message = user_message(e)
        if message is None:
            raise
        return report_error(cmd, f"sweep job {hc.job.num}: {message}")


def _quote(value: str) -> str:
    """A value as one Hydra override token (paths with spaces, commas or brackets)."""
    if all(c.isalnum() or c in "/._-:+" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


__all__ = ["SWEEP_HYDRA_KEYS", "plan_sweep", "run_job", "run_sweep"]

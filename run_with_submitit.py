"""Submit fine-tuning (main_deploy.py, the default) or pruning (main.py) to SLURM with submitit.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition P --timeout 4320 --job_dir ft/ \
        --model deit_base_patch16_224_deploy --masked_model out/checkpoint_pruned_00.pth --data-path /imagenet
    python run_with_submitit.py --script prune --nodes 1 --ngpus 8 --partition P --job_dir out/ \
        --finetune deit_base_patch16_224.pth --data-path /imagenet --need_hessian ...

One task per GPU: each sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (the job's first host) and
MASTER_PORT (derived from the job id) from `submitit.JobEnvironment()` and calls the script's `main`.
Every flag the launcher does not know is the script's, parsed by the script's own parser before
anything is submitted (a bad flag fails at once). `--output_dir` defaults to `--job_dir`; submitit's
files and each task's log go to JOB_DIR/submitit/JOB_ID/ (JOB_DIR/submitit/ with --local). `--local`
runs the job on this machine with submitit's LocalExecutor (`--ngpus` processes; gloo on
`--device cpu`), to try the launcher out.

Requeue: on preemption or time-out submitit calls `Job.checkpoint()` on rank 0. An unfinished job is
resubmitted unchanged; fine-tuning always trains with --auto_resume, so the rerun resumes from
OUTPUT_DIR/checkpoint.pth (the epoch in progress is redone; on CPU bit for bit, see engine/loops.py).
A finished job is never restarted: fine-tuning is finished once its `main` returned or log.txt holds
epoch `--epochs - 1`. Pruning has no resume: it is finished once its checkpoint_pruned_00.pth was
written by this submission (the file is new or newer than at submission), and is otherwise rerun from
the start (an interrupted pass writes no checkpoint, so main.py does not refuse the rerun); a rerun
that finds its checkpoint already written does nothing.
"""
import argparse
import copy
import importlib
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.abspath(__file__))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from utils.errors import Parser, UserError, cli_entry, option_flags  # noqa: E402 (after the sys.path line)

NO_SUBMITIT = "run_with_submitit.py needs submitit: pip install submitit"
SIGNAL_DELAY_S = 120  # submitit's preemption / time-out signal (USR2) comes this long before the end


@dataclass(frozen=True)
class Script:
    module: str  # main_deploy or main
    checkpoint: str  # the file that marks its progress in --output_dir


SCRIPTS = {"finetune": Script("main_deploy", "checkpoint.pth"), "prune": Script("main", "checkpoint_pruned_00.pth")}
SCRIPT_NAMES = {"finetune": "finetune", "deploy": "finetune", "main_deploy.py": "finetune",
                "prune": "prune", "main.py": "prune"}


def script_name(text: str) -> str:
    if text not in SCRIPT_NAMES:
        raise argparse.ArgumentTypeError(f"expected finetune (main_deploy.py) or prune (main.py), got {text!r}")
    return SCRIPT_NAMES[text]


def positive(kind: type, what: str):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
        return value

    convert.__name__ = what
    return convert


def get_args_parser() -> argparse.ArgumentParser:
    """The launcher's own flags; every other flag goes to the script."""
    parser = Parser(description="Submit main_deploy.py (default) or main.py to SLURM with submitit; "
                                "other flags are the script's", allow_abbrev=False, add_help=False)
    parser.add_argument("-h", "--help", action="store_true", help="this help, then the script's")
    parser.add_argument("--script", type=script_name, default="finetune",
                        help="finetune (main_deploy.py, default) or prune (main.py)")
    parser.add_argument("--job_dir", default=None, help="submitit's files and logs (required); default --output_dir")
    parser.add_argument("--nodes", type=positive(int, "an integer"), default=1, help="nodes (default: 1)")
    parser.add_argument("--ngpus", type=positive(int, "an integer"), default=8,
                        help="GPUs, and so tasks, per node (default: 8)")
    parser.add_argument("--timeout", type=positive(float, "a number"), default=4320,
                        help="time limit of each attempt, in minutes (default: 4320, 72 h)")
    parser.add_argument("--partition", default="", help="SLURM partition")
    parser.add_argument("--account", default="", help="SLURM account")
    parser.add_argument("--qos", default="", help="SLURM quality of service")
    parser.add_argument("--constraint", default="", help="SLURM node constraint, e.g. volta32gb")
    parser.add_argument("--comment", default="", help="SLURM job comment")
    parser.add_argument("--cpus_per_task", type=positive(int, "an integer"), default=10,
                        help="CPU cores per task (default: 10)")
    parser.add_argument("--mem_gb", type=positive(int, "an integer"), default=None,
                        help="memory per node in GB (default: the partition's)")
    parser.add_argument("--max_timeouts", type=positive(int, "an integer"), default=10,
                        help="requeues after a time-out before submitit gives up (preemptions do not count; "
                             "default: 10)")
    parser.add_argument("--local", action="store_true",
                        help="run here with submitit's LocalExecutor (--ngpus processes on one node)")
    return parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_port(job_id: str) -> int:
    """The rendezvous port every task of a SLURM job derives alike from its id (in 20000..39999)."""
    digits = re.sub(r"\D", "", job_id)
    return 20000 + int(digits) % 20000 if digits else 29500


def mtime(path: str) -> Optional[float]:
    return os.path.getmtime(path) if os.path.isfile(path) else None


def last_epoch(output_dir: str) -> Optional[int]:
    """The epoch of log.txt's last line (main_deploy.py appends one per finished epoch), None without one."""
    try:
        with open(os.path.join(output_dir, "log.txt")) as f:
            lines = [line for line in f if line.strip()]
        return int(json.loads(lines[-1])["epoch"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Job:
    """What each task runs: the script's `main` on the parsed flags; `checkpoint()` requeues it.

    Args:
        script: "finetune" or "prune".
        argv: the script's flags as given (for its "command:" log line).
        ns: the script's parsed flags (each attempt runs on a fresh copy).
        local: run under submitit's LocalExecutor (rendezvous on 127.0.0.1, `port`).
        checkpoint_mtime: modification time of the pruned checkpoint at submission (None: absent).
        port: the local rendezvous port (a free one, picked anew for each attempt).
    """

    def __init__(self, script: str, argv: List[str], ns: argparse.Namespace, local: bool = False,
                 checkpoint_mtime: Optional[float] = None, port: Optional[int] = None):
        self.script, self.argv, self.ns, self.local = script, list(argv), ns, local
        self.checkpoint_mtime = checkpoint_mtime
        self.port = port if port is not None or not local else free_port()
        self.repo = REPO
        self.returned = False  # set in the running task once `main` returned

    @property
    def output_checkpoint(self) -> str:
        return os.path.join(self.ns.output_dir, SCRIPTS[self.script].checkpoint)

    @property
    def training(self) -> bool:
        return self.script == "finetune" and not (self.ns.eval or self.ns.throughput)

    def rendezvous(self, env) -> Dict[str, str]:
        """torchrun's variables for this task, from submitit's `JobEnvironment`."""
        host, port = ("127.0.0.1", self.port) if self.local else (env.hostnames[0], job_port(env.job_id))
        return {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
                "MASTER_ADDR": host, "MASTER_PORT": str(port)}

    def finished(self) -> bool:
        """Whether this job is done (never to be restarted); see the module docstring."""
        if self.returned:
            return True
        if self.script == "prune":
            written = mtime(self.output_checkpoint)
            return written is not None and written != self.checkpoint_mtime
        epoch = last_epoch(self.ns.output_dir) if self.training else None
        return epoch is not None and epoch >= self.ns.epochs - 1

    def __call__(self) -> None:
        import submitit

        if self.repo not in sys.path:
            sys.path.insert(0, self.repo)
        env = submitit.JobEnvironment()
        os.environ.update(self.rendezvous(env))
        module = importlib.import_module(SCRIPTS[self.script].module)
        sys.argv = [os.path.join(self.repo, module.__name__ + ".py"), *self.argv]
        if self.script == "prune" and self.finished():
            print(f"{self.output_checkpoint} was written by an earlier attempt of this job: nothing to do", flush=True)
        else:
            module.main(copy.deepcopy(self.ns))
        self.returned = True

    def checkpoint(self):
        """submitit's hook on preemption / time-out (rank 0): a fresh copy to requeue, None when finished."""
        import submitit

        if self.finished():
            print(f"job finished ({self.ns.output_dir}): not requeued", flush=True)
            return None
        how = (f"resumes from {self.output_checkpoint} (--auto_resume)" if self.training else "reruns from the start")
        print(f"requeued: the next attempt {how}", flush=True)
        fresh = Job(self.script, self.argv, self.ns, self.local, self.checkpoint_mtime)
        return submitit.helpers.DelayedSubmission(fresh)


def launcher_flags() -> Dict[str, str]:
    from args import script_flags

    return {**script_flags(), **option_flags(get_args_parser())}


def parse(argv: List[str]) -> Tuple[argparse.Namespace, argparse.Namespace, List[str]]:
    """(launcher flags, the script's parsed flags, the script's argv as it will run)."""
    launcher = get_args_parser()
    largs, rest = launcher.parse_known_args(argv)
    if largs.help:
        launcher.print_help()
        print(f"\nflags of {SCRIPTS[largs.script].module}.py:")
    module = importlib.import_module(SCRIPTS[largs.script].module)
    parser = module.get_args_parser()
    if largs.help:
        parser.print_help()
        sys.exit(0)
    if not largs.job_dir:
        launcher.error("--job_dir is required (the folder for submitit's files and logs)")
    parser.set_defaults(output_dir=None)  # not given: the job dir
    ns = parser.parse_args(rest)
    script_argv = list(rest)
    if ns.output_dir is None:
        ns.output_dir = largs.job_dir
        script_argv += ["--output_dir", largs.job_dir]
    if largs.script == "finetune" and not (ns.eval or ns.throughput):
        if ns.resume:
            raise UserError(f"--resume {ns.resume!r}: run_with_submitit.py fine-tunes with --auto_resume, which "
                            f"resumes from --output_dir/checkpoint.pth; copy the checkpoint there or drop --resume")
        if not ns.auto_resume:
            ns.auto_resume = True
            script_argv.append("--auto_resume")
    if largs.local and largs.nodes > 1:
        raise UserError(f"--nodes {largs.nodes}: --local runs on this machine only (use --nodes 1)")
    for flag, path in (("--job_dir", largs.job_dir), ("--output_dir", ns.output_dir)):
        if os.path.isfile(path):
            raise UserError(f"{flag} {path!r} is a file; expected a folder (existing or to create)")
    if largs.script == "prune" and not ns.eval and not ns.overwrite:
        from utils import refuse_to_clobber  # main.py would refuse in the queue: refuse now

        refuse_to_clobber(ns.output_dir, SCRIPTS["prune"].checkpoint, resuming=False, overwrite=False)
    return largs, ns, script_argv


def make_executor(submitit, largs: argparse.Namespace, ns: argparse.Namespace):
    folder = os.path.join(largs.job_dir, "submitit", "%j")
    cuda = not str(ns.device).startswith("cpu")
    if largs.local:  # its controller would make a folder named %j: the job id names the files
        executor = submitit.LocalExecutor(folder=os.path.dirname(folder), max_num_timeout=largs.max_timeouts)
        executor.update_parameters(tasks_per_node=largs.ngpus, gpus_per_node=largs.ngpus if cuda else 0,
                                   timeout_min=largs.timeout, nodes=1)
        return executor
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=largs.max_timeouts)
    except Exception as err:  # no sbatch / srun on this machine
        raise UserError(f"cannot submit to SLURM here ({str(err).strip().splitlines()[0]}); "
                        f"--local runs the job on this machine") from None
    extras = {f"slurm_{k}": getattr(largs, k) for k in ("partition", "account", "qos", "constraint", "comment")
              if getattr(largs, k)}
    if largs.mem_gb:
        extras["mem_gb"] = largs.mem_gb
    executor.update_parameters(name=f"savit_{largs.script}", nodes=largs.nodes, tasks_per_node=largs.ngpus,
                               gpus_per_node=largs.ngpus if cuda else None, cpus_per_task=largs.cpus_per_task,
                               timeout_min=int(largs.timeout), slurm_signal_delay_s=SIGNAL_DELAY_S, **extras)
    return executor


def submit(argv: List[str]):
    """Parse, check and submit; returns the submitit job."""
    largs, ns, script_argv = parse(argv)
    try:
        import submitit
    except ImportError:
        raise UserError(NO_SUBMITIT) from None
    checkpoint_mtime = mtime(os.path.join(ns.output_dir, SCRIPTS["prune"].checkpoint))
    job_fn = Job(largs.script, script_argv, ns, local=largs.local, checkpoint_mtime=checkpoint_mtime)
    executor = make_executor(submitit, largs, ns)
    os.makedirs(ns.output_dir, exist_ok=True)
    # the tasks import this module and the scripts by name
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    job = executor.submit(job_fn)
    where = "on this machine" if largs.local else f"on {largs.nodes} node(s)"
    print(f"submitted job {job.job_id} ({SCRIPTS[largs.script].module}.py, {largs.nodes * largs.ngpus} tasks "
          f"{where}); logs: {job.paths.folder}/{job.job_id}_<task>_log.out and .err; outputs: {ns.output_dir}",
          flush=True)
    return job


@cli_entry(flags=launcher_flags)
def main(argv: Optional[List[str]] = None):
    return submit(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()

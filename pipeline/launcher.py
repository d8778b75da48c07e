"""Start a training stage on one process or, with ``--nproc`` > 1, under ``torchrun`` (docs/distributed.md).

What the MLproject's training entry points run, so that ``mlflow run . -e train_adapter -P nproc=2`` works:

    python -m pipeline.launcher --nproc=2 --torchrun="--max-restarts=1" train_adapter ssl=tiny ...

With one process and no torchrun options it becomes ``python -m pipeline.stages.<stage> ...`` (today's single
process, the same PID, so ``mlflow run``'s signals reach the job); otherwise PyTorch's own launcher,
``python -m torch.distributed.run --nproc_per_node=N [options] -m pipeline.stages.<stage> ...``. Without
rendezvous options (``--nnodes``, ``--rdzv-endpoint``, ``--master-addr``...) it adds ``--standalone``: one
machine, a free port, so two jobs on one machine do not collide. The process is replaced (exec), never
supervised from here.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys

from pipeline.stages import TRAINING_STAGES

log = logging.getLogger(__name__)

# pipeline.engine.cli.EXIT_BAD_INPUT (not imported: pipeline.config would load Hydra before the exec)
EXIT_BAD_INPUT = 2

# torchrun options that say where the rendezvous is (then --standalone must not be added)
RENDEZVOUS_OPTIONS = (
    "--nnodes",
    "--rdzv",
    "--rdzv-",
    "--rdzv_",
    "--master-addr",
    "--master_addr",
    "--master-port",
    "--master_port",
    "--standalone",
    "--node-rank",
    "--node_rank",
)


def module(stage: str) -> str:
    """The module ``python -m`` runs for ``stage``: the stage's own module, or the sweep."""
    return "pipeline.sweep" if stage == "sweep" else TRAINING_STAGES[stage].partition(":")[0]


def command(stage: str, nproc: int, torchrun: str, args: list[str]) -> list[str]:
    """The command line that runs ``stage`` with ``args`` on ``nproc`` processes per machine."""
    extra = shlex.split(torchrun)
    if nproc == 1 and not extra:
        return [sys.executable, "-m", module(stage), *args]
    rendezvous = [] if any(word.startswith(RENDEZVOUS_OPTIONS) for word in extra) else ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        *rendezvous,
        *extra,
        "-m",
        module(stage),
        *args,
    ]


def parse(argv: list[str]) -> tuple[str, int, str, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m pipeline.launcher", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nproc", default="1", help="processes per machine (torchrun --nproc_per_node); 1: no torchrun"
    )
    parser.add_argument(
        "--torchrun",
        default="",
        help="more torchrun options, e.g. '--nnodes=2 --rdzv-endpoint=host:29400 --max-restarts=3'",
    )
    parser.add_argument(
        "stage",
        choices=[*sorted(TRAINING_STAGES), "sweep"],
        help="the training stage, or sweep (every trial on all the processes)",
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the stage's words: overrides, resume_run=...")
    ns = parser.parse_args(argv)
    try:
        nproc = int(ns.nproc)
    except ValueError:
        nproc = 0
    if nproc < 1:
        raise ValueError(
            f"nproc={ns.nproc!r} must be a whole number of processes, 1 or more (e.g. -P nproc=2, one "
            "per GPU of this machine)"
        )
    return ns.stage, nproc, ns.torchrun, ns.args


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        stage, nproc, torchrun, args = parse(sys.argv[1:])
        cmd = command(stage, nproc, torchrun, args)
    except ValueError as err:
        log.error("%s", err)
        sys.exit(EXIT_BAD_INPUT)
    if cmd[1:3] != ["-m", module(stage)]:
        log.info("Starting %s", shlex.join(cmd[1:]))
        # Slurm's --signal=USR1 reaches every process of the job step: torchrun's agent, which has no handler for it
        # and would die, and its workers, which stop to be requeued. An ignored signal stays ignored across exec and
        # in the agent's children until a worker's engine installs its own handler.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()

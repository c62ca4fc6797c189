"""The sharpness command: train one run, compare optimizers over seeds, report a run folder, measure the
curvature of a trained model, reproduce the papers' experiments.

Settings come from, in increasing priority: the defaults, a ``--config file.toml`` (keys as the flags, with
``-`` or ``_``), and the flags given. Every setting is checked before any data is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sharpness import __version__
from sharpness._deprecation import DeprecatedFlag
from sharpness.data import DATASETS
from sharpness.experiments.compare import RUNS_DIR, check_compare, compare, format_table, plan_runs, run_label
from sharpness.experiments.config import DEFAULT_MODELS, ConfigError, RunConfig, build_config, read_toml
from sharpness.experiments.launch import WorkerFailed, launch
from sharpness.experiments.measure import DEFAULT_WHAT, SPLITS, WHAT, format_measurements, measure
from sharpness.experiments.report import write_report
from sharpness.experiments.runner import CONFIG_NAME, FINAL_NAME, LAUNCH_RECORD, check_run, run_training
from sharpness.optim.registry import OPTIMIZERS
from sharpness.reproductions import REPRODUCTIONS, format_checks, reproduce
from sharpness.train import CHECKPOINT_NAME, Callback, NonFiniteLossError, Trainer, load_checkpoint, read_json, to_json
from sharpness.train.distributed import agree, is_rank_zero, launched_by_torchrun, process_group, timeout

RUNTIME_SETTINGS = ("device", "threads")
"""The settings a resumed run may change: where and how fast it computes, not what."""


class Interrupted(Exception):
    """Ctrl-C during a run; the message says how to resume it (exit status 130)."""


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _run_flags(parser: argparse.ArgumentParser, *, single: bool) -> None:
    """Flags shared by ``train`` and ``compare``; defaults are suppressed so that only given flags override."""
    add = parser.add_argument
    add("--config", type=Path, help="TOML file with any of these settings (flags override it)")
    add("--dataset", help=f"one of {', '.join(DATASETS)} (default mnist1d)")
    add("--model", help="mlp, cnn1d, cnn1d-bn/-ln, cnn, resnet18, wrn-D-K (default: the dataset's: mnist1d→cnn1d, ...)")
    if single:
        add("--optimizer", help=f"one of {', '.join(OPTIMIZERS)} (default sgd)")
        add("--seed", type=int, help="seed of the initial weights, data order and label noise (default 0)")
    add("--rho", type=float, help="SAM radius (default 0.05)")
    add("--lr", type=float, help="learning rate (default 0.05)")
    add("--momentum", type=float, help="SGD momentum (default 0.9)")
    add("--weight-decay", type=float, help="weight decay (default 5e-4)")
    add("--batch-size", type=int, help="batch size (default 64)")
    add("--epochs", type=int, help="epochs (default 60)")
    add("--schedule", help="learning-rate schedule: cosine (default) or constant")
    add("--label-noise", type=float, help="fraction of training labels replaced by another class (default 0)")
    add("--val-split", type=float, help="fraction of the training set held out for validation (default 0)")
    add("--augment", action=argparse.BooleanOptionalAction, help="training augmentation (default: on for CIFAR)")
    add("--data-dir", help="folder with the CIFAR python-pickle files")
    add("--device", help="cpu (default) or cuda[:N]")
    add("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    add("--checkpoint-every", type=int, help="write checkpoint.pt every N epochs (default 1)")
    add("--track-sharpness-every", type=int, help="every N steps: λ_max (Lanczos), ||g|| and the stability edge")
    add("--k", type=int, help="periodicsam/looksam: SAM every k steps (default 2 / 5)")
    add("--sam-prob", type=float, help="randomsam: probability of a SAM step (default 0.5)")
    add("--alpha", type=float, help="looksam/aelooksam: LookSAM's reuse weight (default 0.3)")
    add("--delta", type=float, help="aesam/aelooksam: EMA factor of ||g||² statistics (default 0.9)")
    add("--lambda1", type=float, help="aesam/aelooksam: threshold c_t at the end of training (default -1)")
    add("--lambda2", type=float, help="aesam/aelooksam: threshold c_t at the start of training (default 1)")
    add("--micro-batch", type=int, help="sam/asam: m of m-sharpness, a perturbation per micro-batch of m examples")
    add("--sam-start", type=float, help="latesam/lateaesam: fraction of the steps before SAM starts (default 0.8)")
    add("--perturb", help="SAM family: parameters ε moves: all (default), norm (normalisation layers) or name prefixes")
    add("--out", type=Path, help="run folder (default: runs/<command>-<dataset>-<time>)")
    add("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    add("--quiet", action="store_true", help="no progress bar")
    add("--nproc-per-node", type=int, help="train in N data-parallel processes (torch.distributed.run; default 1)")
    add("--fsdp", action="store_true", help="with several processes: shard the model (FSDP2) instead of DDP")
    for action in parser._actions:
        if action.dest not in ("help", "quiet"):
            action.default = argparse.SUPPRESS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharpness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"sharpness {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train one model with one optimizer")
    _run_flags(train, single=True)
    comp = commands.add_parser("compare", help="compare optimizers over seeds (default: SGD vs SAM, MNIST-1D)")
    _run_flags(comp, single=False)
    comp.add_argument("--optimizers", type=_names, default=argparse.SUPPRESS, help="comma list (default sgd,sam)")
    comp.add_argument("--seeds", type=int, default=argparse.SUPPRESS, help="number of seeds (default 3)")
    comp.add_argument("--first-seed", type=int, default=argparse.SUPPRESS, help="seeds start here (default 0)")
    comp.add_argument(
        "--rho-grid", type=_floats, default=argparse.SUPPRESS, help="select rho on --val-split from these"
    )
    comp.add_argument(
        "--equal-compute",
        action="store_true",
        default=argparse.SUPPRESS,
        help="optimizers with one pass per step get twice the epochs",
    )
    report = commands.add_parser("report", help="regenerate the figure and HTML report of a run folder")
    report.add_argument("run_dir", type=Path)
    _measure_flags(commands)
    reproduce = commands.add_parser(
        "reproduce", help="run a paper's experiment and check its claims (PASS/FAIL/UNDECIDED); 'all' runs every one"
    )
    reproduce.add_argument("name", help=f"one of {', '.join(REPRODUCTIONS)}, or all")
    reproduce.add_argument("--quick", action="store_true", help="the reduced version (well under a minute each)")
    reproduce.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    reproduce.add_argument("--out", type=Path, default=Path("runs") / "reproduce", help="default runs/reproduce")
    return parser


#: ``measure`` flags renamed to the counts' vocabulary (``docs/curvature.md``, "Counts"): old → new.
RENAMED_MEASURE_FLAGS = {
    "--samples": "--trace-matvecs",
    "--max-iter": "--eig-matvecs",
    "--density-vectors": "--density-probes",
    "--density-steps": "--density-matvecs-per-probe",
    "--sharpness-samples": "--sharpness-probes",
}


def _measure_flags(commands: Any) -> None:
    """The ``measure`` subcommand; its defaults are those of :func:`sharpness.experiments.measure.measure`."""
    meas = commands.add_parser(
        "measure", help="Hessian eigenvalues, trace, Frobenius norm, spectral density and ρ-sharpness of a run"
    )
    defaults = {name: p.default for name, p in inspect.signature(measure).parameters.items()}
    defaults["what"] = ",".join(DEFAULT_WHAT)

    def add(flag: str, text: str, **kwargs: Any) -> None:
        default = defaults.get(flag.lstrip("-").replace("-", "_"))
        shown = f" (default {default})" if default is not None else ""
        meas.add_argument(flag, default=default, help=text + shown, **kwargs)

    meas.add_argument("path", type=Path, metavar="RUN_DIR_OR_CHECKPOINT", help="a train run folder or its checkpoint")
    add("--what", f"comma list of {','.join(WHAT)}, or all")
    add("--measure-size", "measure on the first N examples of the split", type=int)
    add("--split", "the measurement split", choices=SPLITS)
    add("--mode", "eval: BatchNorm running statistics; train: batch statistics", choices=("eval", "train"))
    add("--backend", "Hessian-vector products", choices=("double_backward", "forward_over_reverse"))
    add("--seed", "seed of the estimators' random vectors", type=int)
    add("--top-k", "top eigenvalues (λ1/λ5 needs 5)", type=int)
    add("--trace-matvecs", "Hessian-vector products per trace (Hutch++, Hutchinson) and Frobenius estimate", type=int)
    add("--rho", "sharpness radius (default: the run's rho, or 0.05)", type=float)
    add("--m", "m-sharpness batch size", type=int)
    add("--adaptive", "adaptive ρ-sharpness (default: on for asam runs)", action=argparse.BooleanOptionalAction)
    add("--params", "comma list of parameter names or prefixes to measure (default: all)", type=_names)
    add("--eig-matvecs", "most Hessian-vector products (Lanczos steps) for eig", type=int)
    add("--tol", "Lanczos relative residual tolerance for eig", type=float)
    add("--density-probes", "SLQ random start vectors", type=int)
    add("--density-matvecs-per-probe", "SLQ Lanczos steps (products) per start vector", type=int)
    add("--sharpness-steps", "worst-case ascent steps", type=int)
    add("--sharpness-probes", "average-case random perturbations", type=int)
    for old, new in RENAMED_MEASURE_FLAGS.items():  # the old spellings, for one release: hidden, with a note
        dest = new.lstrip("-").replace("-", "_")
        meas.add_argument(old, dest=dest, new=new, action=DeprecatedFlag, type=int, default=argparse.SUPPRESS,
                          help=argparse.SUPPRESS)  # fmt: skip
    add("--device", "cpu or cuda[:N] (default: the run's)")
    add("--threads", "torch CPU threads (default: torch's own choice)", type=int)
    add("--out", "output folder (default: RUN_DIR/measure)", type=Path)
    meas.add_argument("--force", action="store_true", help="overwrite an earlier measure.json in the output folder")
    meas.add_argument(
        "--nproc-per-node", type=int, default=1, help="measure in N processes, each on its part of the set (default 1)"
    )


class Progress:
    """A ``tqdm`` bar of epochs on stderr, drawn from the moment training starts (:meth:`start`): bad input found
    while the data and the model are prepared is then reported alone, without an empty bar before it."""

    def __init__(self, total: int, done: int) -> None:
        self.total, self.done = total, done
        self._bar: Any = None

    def start(self) -> Any:
        """The bar, drawn now if it was not yet."""
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, initial=self.done, unit="epoch", file=sys.stderr, dynamic_ncols=True, mininterval=0.5
            )
        return self._bar

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class EpochProgress(Callback):
    """Advances a shared :class:`Progress` bar by one per epoch and shows the run and its latest test metric."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress, self.label = progress, label

    def on_train_start(self, trainer: Trainer) -> None:
        self.progress.start()

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        metric = (
            f"test acc {record['test_acc']:.3f}" if "test_acc" in record else f"test loss {record['test_loss']:.4g}"
        )
        bar = self.progress.start()
        bar.set_postfix_str(f"{self.label} epoch {record['epoch']}: {metric}", refresh=False)
        bar.update(1)


def _progress_bar(total: int, done: int, quiet: bool) -> Progress | None:
    return None if quiet else Progress(total, done)


def _epochs_done(run_dir: Path) -> int:
    """Epochs a (resumable) run folder has completed: all of them once final, else its checkpoint's."""
    if (run_dir / FINAL_NAME).is_file():
        return read_json(run_dir / FINAL_NAME)["epochs"]
    if (run_dir / CHECKPOINT_NAME).is_file():
        return load_checkpoint(run_dir)["train_state"]["epoch"]
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    values = read_toml(args.config) if "config" in args else {}
    skip = {"command", "config", "out", "resume", "quiet", "nproc_per_node"}
    values.update({key: value for key, value in vars(args).items() if key not in skip})
    return values


def _out_dir(args: argparse.Namespace, dataset: str) -> Path:
    if "out" in args:
        return args.out
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{args.command}-{dataset}-{stamp}"


def _saved_settings(run_dir: Path, kind: str) -> dict[str, Any]:
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} does not exist (is {run_dir} a sharpness run folder?)")
    saved = read_json(path)
    if not isinstance(saved, dict) or saved.pop("kind", None) != kind:
        raise ConfigError(f"cannot resume: {run_dir} is not a '{kind}' run folder")
    if kind == "compare":
        saved.update(saved.pop("run"))
    for key in LAUNCH_RECORD:  # how a train run was launched, not a setting
        saved.pop(key, None)
    return saved


def _resolved_settings(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """The settings of a new run, or the saved settings of the resumed one.

    A resumed run may change only ``--device`` and ``--threads``; any other setting given (a flag or a ``--config``
    key) whose value differs from the saved one is a ConfigError naming each (a longer ``--epochs`` would change
    the cosine schedule, so the run would not continue: it would be another run).
    """
    if "resume" not in args:
        return _settings(args)
    saved = _saved_settings(args.resume, kind)
    given = _settings(args)
    build_config({**saved, **given}, compare=kind == "compare")  # unknown keys and bad values first
    conflicts = [
        f"{_flag(key, value)} differs from the run's saved {key} {_shown(_effective(key, saved))}"
        for key, value in given.items()
        if key not in RUNTIME_SETTINGS and _effective(key, saved | given) != _effective(key, saved)
    ]
    if "out" in args and args.out.resolve() != args.resume.resolve():
        conflicts.append(f"--out {args.out} differs from the run folder {args.resume}")
    if conflicts:
        raise ConfigError(
            f"cannot resume {args.resume}: {'; '.join(conflicts)}; a resumed run continues with its saved settings "
            "(only --device and --threads may change): drop the flag(s), or start a new run with --out"
        )
    return saved | {key: value for key, value in given.items() if key in RUNTIME_SETTINGS}


def _effective(key: str, values: dict[str, Any]) -> Any:
    """The value of setting ``key`` in ``values``; an unset model is the dataset's default model."""
    if key == "model" and values.get("model") is None:
        return DEFAULT_MODELS.get(values.get("dataset", RunConfig.dataset))
    return values.get(key)


def _flag(key: str, value: Any) -> str:
    """``key = value`` as the flag that gives it, e.g. ``--epochs 100``, ``--no-augment``."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {_shown(value)}"


def _shown(value: Any) -> str:
    """A setting's value as it is written on the command line (lists comma-separated)."""
    if isinstance(value, list):
        return ",".join(f"{item:g}" if isinstance(item, float) else str(item) for item in value)
    return str(value)


@contextlib.contextmanager
def _resumable(command: str, run_dir: Path, nproc: int = 1) -> Iterator[None]:
    """Turn Ctrl-C into :class:`Interrupted`, whose message is the command that resumes ``run_dir``.

    The checkpoints are written atomically, so the run folder keeps the last completed one.
    """
    try:
        yield
    except KeyboardInterrupt:
        if not (run_dir / CONFIG_NAME).is_file():
            raise Interrupted(f"interrupted before {run_dir} was written; there is nothing to resume") from None
        raise Interrupted(f"interrupted; resume with: {_resume_command(command, run_dir, nproc)}") from None


def _resume_command(command: str, run_dir: Path, nproc: int) -> str:
    processes = f" --nproc-per-node {nproc}" if nproc > 1 else ""
    return f"sharpness {command} --resume {shlex.quote(str(run_dir))}{processes}"


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    """``train`` or ``compare``: in this process (also as one of ``torchrun``'s), or launched in N processes."""
    nproc = args.nproc_per_node if "nproc_per_node" in args else 1
    if nproc < 1:
        raise ConfigError(f"--nproc-per-node must be an integer >= 1, got {nproc}")
    if launched_by_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", nproc))
        if "nproc_per_node" in args and nproc != local:
            raise ConfigError(f"--nproc-per-node {nproc} differs from torchrun's {local} processes on this node")
    elif nproc > 1:
        return _launch(args, argv, nproc)
    return _train(args) if args.command == "train" else _compare(args)


def _launch(args: argparse.Namespace, argv: list[str], nproc: int) -> int:
    """Check everything here, then run the same command in ``nproc`` processes (:mod:`sharpness.experiments.launch`).

    Exit status: 0, the status of a process that stopped on bad input (2, its message printed) or 1 when a process
    failed (this names it and the command that resumes the run).
    """
    kind, resume = args.command, "resume" in args
    config = build_config(_resolved_settings(args, kind), compare=kind == "compare")
    run = config if isinstance(config, RunConfig) else config.run
    if run.device != "cpu" and (run.device != "cuda" or _cuda_count() < nproc):
        raise ConfigError(
            f"--device {run.device} with --nproc-per-node {nproc}: pass --device cuda, with at least {nproc} CUDA "
            f"devices (process i uses cuda:i; torch sees {_cuda_count()})"
        )
    timeout()  # a bad SHARPNESS_COLLECTIVE_TIMEOUT is an error here, before any process starts
    out = args.resume if resume else _out_dir(args, run.dataset)
    if isinstance(config, RunConfig):
        check_run(config, out, resume=resume, world_size=nproc)
    else:
        check_compare(config, out, resume=resume, world_size=nproc)
    extra = ["--out", str(out)] if not resume and "out" not in args else []
    kept = "its last completed epoch is kept" if kind == "train" else "finished runs and checkpoints are kept"
    return _launch_processes([*argv, *extra], nproc, f"{out}: {kept}; resume with: {_resume_command(kind, out, nproc)}")


def _launch_processes(argv: list[str], nproc: int, after_failure: str) -> int:
    """Run ``sharpness ARGV`` in ``nproc`` processes; the exit status, with one line when a process failed.

    0; 2 or 130 when a process stopped on bad input or Ctrl-C (it printed its own one-line message); 1 when a
    process failed: the line names it, then ``after_failure`` (what is kept, how to go on).
    """
    try:
        launch([sys.executable, "-u", "-m", "sharpness.cli", *argv], nproc)
    except KeyboardInterrupt:
        return 130  # the processes got the signal too: rank 0 printed what to do
    except WorkerFailed as exc:
        if exc.exitcode in (2, 130):
            return exc.exitcode
        print(f"sharpness: the job stopped: {exc} and the others were stopped; {after_failure}", file=sys.stderr)
        return 1
    return 0


def _cuda_count() -> int:
    """CUDA devices torch sees here (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _train(args: argparse.Namespace) -> int:
    resume = "resume" in args
    config = build_config(_resolved_settings(args, "train"), compare=False)
    assert isinstance(config, RunConfig)
    with process_group(config.device, config.threads):
        rank_zero = is_rank_zero()
        run_dir = args.resume if resume else agree(_out_dir(args, config.dataset))
        done = _epochs_done(run_dir) if resume and rank_zero else 0
        if resume and done == 0 and rank_zero:
            print(f"{run_dir} has no checkpoint (the run stopped before its first one): training it from the start")
        bar = _progress_bar(config.epochs, done, args.quiet or not rank_zero)
        callbacks = [EpochProgress(bar, config.optimizer)] if bar is not None else []
        try:
            with _resumable("train", run_dir, _processes()):
                final = run_training(config, run_dir, resume=resume, callbacks=callbacks)
                if rank_zero:
                    write_report(run_dir)
        finally:
            if bar is not None:
                bar.close()
    if rank_zero:
        shown = {k: v for k, v in final.items() if isinstance(v, int | float)}
        print(to_json(shown, indent=2))
        print(f"run folder: {run_dir}  (report: {run_dir / 'report.html'})")
    return 0


def _compare(args: argparse.Namespace) -> int:
    resume = "resume" in args
    config = build_config(_resolved_settings(args, "compare"), compare=True)
    with process_group(config.run.device, config.run.threads):
        rank_zero = is_rank_zero()
        out_dir = args.resume if resume else agree(_out_dir(args, config.run.dataset))
        runs = list(plan_runs(config))
        done = sum(_epochs_done(out_dir / RUNS_DIR / run_label(run)) for run in runs) if resume and rank_zero else 0
        bar = _progress_bar(sum(run.epochs for run in runs), done, args.quiet or not rank_zero)
        try:
            with _resumable("compare", out_dir, _processes()):
                summary = compare(
                    config,
                    out_dir,
                    resume=resume,
                    callbacks=lambda run: [EpochProgress(bar, run_label(run))] if bar is not None else [],
                )
                if rank_zero:
                    write_report(out_dir)
        finally:
            if bar is not None:
                bar.close()
    if rank_zero:
        print(format_table(summary))
        print(f"run folder: {out_dir}  (report: {out_dir / 'report.html'})")
    return 0


def _measure(args: argparse.Namespace, argv: list[str]) -> int:
    """``measure``: in this process (also as one of ``torchrun``'s), or checked here and launched in N processes."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    nproc = args.nproc_per_node
    if nproc < 1:
        raise ConfigError(f"--nproc-per-node must be an integer >= 1, got {nproc}")
    skip = ("command", "path", "threads", "nproc_per_node")
    options = {key: value for key, value in vars(args).items() if key not in skip}
    if nproc > 1 and not launched_by_torchrun():
        measure(args.path, **options, check_only=True, processes=nproc)  # bad input: one line, before any process
        return _launch_processes(argv, nproc, "nothing was written")
    with process_group(args.device or "cpu", args.threads):
        result = measure(args.path, **options)
        if not is_rank_zero():
            return 0
    print(format_measurements(result))
    for path in result["files"]:
        print(f"wrote {path}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    """Exit code 1 when a claim failed; 0 otherwise (every claim PASS or UNDECIDED, not decidable at this budget)."""
    results = reproduce(args.name, args.out, quick=args.quick, seed=args.seed)
    for result in results:
        print(format_checks(result))
    where = args.out if args.name == "all" else args.out / args.name
    print(f"report: {where / 'report.html'}")
    return 1 if any(result.status == "FAIL" for result in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("train", "compare"):
            return _run(args, argv)
        if args.command == "measure":
            return _measure(args, argv)
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ConfigError(f"sharpness {args.command} runs in one process; run it without torchrun")
        if args.command == "report":
            for path in write_report(args.run_dir):
                print(f"wrote {path}")
            return 0
        return _reproduce(args)
    except NonFiniteLossError as exc:
        if _rank() == 0:  # every process stops at the same step with the same message
            print(f"sharpness: training stopped: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        if _rank() == 0:  # every process got the signal
            print(f"sharpness: {exc}", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        where = f" (rank {_rank()})" if _rank() else ""
        print(f"sharpness{where}: error: {exc}", file=sys.stderr)
        return 2


def _rank() -> int:
    """This process's rank under ``torchrun`` (0 outside it)."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def _processes() -> int:
    """The number of processes of this ``torchrun`` job (1 outside it)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


if __name__ == "__main__":
    raise SystemExit(main())

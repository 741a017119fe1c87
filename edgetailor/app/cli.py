"""The ``edgetailor`` command line: a thin click layer over the Python API.

Commands and flags named in the README are a contract (scripts and the mobile
integration rely on them); add flags freely, keep those working. Heavy
modules are imported inside each command so that ``edgetailor device ...``
never loads torch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from edgetailor.toolkit import __version__
from edgetailor.toolkit.errors import EdgetailorError
from edgetailor.toolkit.formats import DEFAULT_FORMATS, EXTRA_TRAINING, FORMATS, STEPS
from edgetailor.server_side.learngene.rules import RULES as LEARNGENE_METHODS
from edgetailor.app.progress import ProgressBars


class _FriendlyGroup(click.Group):
    """Print EdgetailorError as a message with its hint, exit 2, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgetailorError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgetailor")
def main() -> None:
    """edgetailor: personalise a model on the user's own device.

    \b
    The loop:
      edgetailor server pretrain --out ge/          train the Global Expert (GE)
      edgetailor export bundle --model ge/ --out b   write a device bundle (dir + .zip)
      edgetailor device personalize --bundle b.zip --state s/ --samples mine.npz
      edgetailor device evaluate   --bundle b.zip --state s/ --samples test.npz
    or all of it on built-in data: edgetailor demo
    """



# ------------------------------------------------------- training environment

def _interval(value: str) -> tuple[int, float]:
    """``--checkpoint-every``: N (training steps), or Ns / Nm (seconds / minutes of training)."""
    text = value.strip().lower()
    try:
        if text.endswith(("m", "s")):
            seconds = float(text[:-1]) * (60 if text.endswith("m") else 1)
            if not seconds > 0:
                raise ValueError
            return 0, seconds
        steps = int(text)
        if steps < 1:
            raise ValueError
        return steps, 0.0
    except ValueError:
        raise click.BadParameter(f"{value!r}: give steps (500) or a time (90s, 5m)",
                                 param_hint="--checkpoint-every") from None


def _training_options(resumable: bool = True):
    """The options every training command shares: where it trains and, when
    ``resumable``, how its training state is kept."""
    def decorate(fn):
        options = [
            click.option("--device", default="auto", show_default=True,
                         help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N. Under torchrun each "
                              "process takes the GPU of its LOCAL_RANK."),
            click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                         show_default=True,
                         help="Autocast for training steps: auto is bf16 on GPUs that have it (fp16 on older "
                              "ones), fp32 on the CPU. Quantization calibration, FlexRound and QAT always run "
                              "in fp32."),
            click.option("--workers", type=click.IntRange(0, 64), default=None,
                         help="Data-loading processes that read, decode and augment batches (default: 0 on "
                              "the CPU, where they would take the cores training uses; 4 on a GPU)."),
        ]
        if resumable:
            options += [
                click.option("--resume", is_flag=True,
                             help="Continue a run that was stopped (killed, out of time) from its training "
                                  "state in OUT.training/; refused if the recipe, model, data or toolkit differ."),
                click.option("--checkpoint-every", "checkpoint_every", default="2m", show_default=True,
                             help="How often the training state is saved: steps (500) or training time "
                                  "(90s, 5m). A kill loses at most this much work."),
            ]
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _training_env(out: Path | None, device: str, precision: str, workers: int | None, resume: bool = False,
                  checkpoint_every: str | None = None, overwrite: bool = False):
    """The TrainingEnv of a command: the device is checked and torchrun's
    process group joined before any work."""
    import shutil

    from edgetailor.server_side.environment import setup
    from edgetailor.server_side.resume import TrainingCheckpoints

    checkpoints = None
    if out is not None and checkpoint_every is not None:
        every_steps, every_seconds = _interval(checkpoint_every)
        folder = out.with_name(out.name + ".training")
        if overwrite and not resume:
            shutil.rmtree(folder, ignore_errors=True)
        checkpoints = TrainingCheckpoints(folder, every_steps, every_seconds, resume)
        checkpoints.check_start()      # before the device, torchrun and any data preparation
    env = setup(device, precision, 0, checkpoints)
    env.workers = workers if workers is not None else (4 if env.device.type == "cuda" else 0)
    return env


def _generic_samples(data: Path | None, env, skip_bad: bool = False):
    """The generic data of a training command: None (the built-in digits) or
    ``data`` prepared once into the sample cache (rank 0 of each machine
    prepares, the others wait and open it)."""
    if data is None:
        return None
    import os

    from edgetailor.server_side.samples import open_samples

    if env.local_rank != 0:
        env.barrier()
    progress = ProgressBars(enabled=env.is_main)
    with env.unpinned():        # one process per machine prepares, on all the cores the command has
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        store = open_samples(data, skip_bad=skip_bad, workers=min(8, cores),
                             progress=lambda d, n: progress("prepare data", d, n))
    progress.close()
    if env.local_rank == 0:
        env.barrier()
    for note in store.notes:
        if env.is_main:
            click.echo(f"note: {note}", err=True)
    return store

# --------------------------------------------------------------------- server
@main.group()
def server() -> None:
    """Build-server side: train the Global Expert on generic data, compress it,
    and grow models of every size from a learngene."""


@server.command("pretrain")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write.")
@click.option("--recipe", default="default", show_default=True,
              help="Shipped recipe name or a TOML file ([pretrain], [experts], [personalize]).")
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Generic training data (.npz, MNIST/EMNIST IDX, or image folder). Default: the built-in digits.")
@click.option("--arch", help="Override the recipe's architecture: lenet5 (convolutional) or vit (transformer).")
@click.option("--depth", type=click.IntRange(1), help="Transformer blocks (vit only).")
@click.option("--epochs", type=int, help="Override the recipe's pretrain.epochs.")
@click.option("--seed", type=int, help="Override the recipe's pretrain.seed.")
@click.option("--skip-bad", is_flag=True, help="Leave out images that cannot be read or hold no ink, and say so.")
@click.option("--evaluate-every", type=click.IntRange(0), default=0,
              help="Measure the test accuracy every N epochs (recorded in the checkpoint's training.history).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_training_options()
def server_pretrain(out: Path, recipe: str, data: Path | None, arch: str | None, depth: int | None,
                    epochs: int | None, seed: int | None, skip_bad: bool, evaluate_every: int, overwrite: bool,
                    device: str, precision: str, workers: int | None, resume: bool, checkpoint_every: str) -> None:
    """Train the Global Expert (default LeNet-5) and save a checkpoint with its
    metadata (data hash, seed, accuracy, recipe, where it trained).

    \b
    Data of any size: --data is prepared once, in parallel, into a cache of
    samples (EDGETAILOR_CACHE, default ~/.cache/edgetailor/samples) that training
    reads a batch at a time. Many processes, one or several machines:
      torchrun --nproc-per-node 2 -m edgetailor server pretrain --out ge/
    (gloo on CPUs, NCCL on GPUs; rank 0 writes; the learning rate scales with
    sqrt(processes), docs/SCALING.md). A killed run continues with --resume."""
    from edgetailor.toolkit.config import load_recipe
    from edgetailor.server_side.environment import session
    from edgetailor.server_side.pretrain import pretrain

    cfg = load_recipe(recipe)
    if arch is not None and arch != cfg.pretrain.arch:
        # another family: its own default widths and feature taps, not the recipe's
        cfg.pretrain.arch, cfg.pretrain.widths, cfg.pretrain.depth = arch, [], 0
        cfg.experts.le_feature_tap = cfg.experts.gn_feature_tap = ""
    if depth is not None:
        cfg.pretrain.depth = depth
    if epochs is not None:
        cfg.pretrain.epochs = epochs
    if seed is not None:
        cfg.pretrain.seed = seed
    cfg.validate()
    if out.exists() and not overwrite:
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    env = _training_env(out, device, precision, workers, resume, checkpoint_every, overwrite)
    with session(env):
        dataset = _generic_samples(data, env, skip_bad)
        progress = ProgressBars(enabled=env.is_main)
        started = time.perf_counter()
        ckpt = pretrain(out, cfg, dataset, progress=lambda e, n: progress("pretrain GE", e, n), overwrite=overwrite,
                        env=env, evaluate_every=evaluate_every)
        progress.close()
    if env.is_main:
        trained = ckpt.meta.training
        resumed = f", resumed at {trained['resumed_at']}" if trained.get("resumed_at") else ""
        click.echo(f"GE ({ckpt.meta.arch}) trained in {time.perf_counter() - started:.1f}s on {trained['device']} "
                   f"x{trained['processes']} ({trained['precision']}, {trained['images_per_second']:,.0f} images/s"
                   f"{resumed}); generic test accuracy {ckpt.meta.generic_accuracy:.4f}; saved to {out}")


@server.command("simulate-data")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Folder to write (train-images-idx3-ubyte and train-labels-idx1-ubyte).")
@click.option("--images", "count", type=click.IntRange(1, 50_000_000), default=500_000, show_default=True,
              help="How many images to make.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed makes the same images.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def server_simulate_data(out: Path, count: int, seed: int, overwrite: bool) -> None:
    """Make a large generic set to try the build server at scale: the
    built-in digits redrawn by as many simulated writers as images (each its
    own rotation, size, offset and pen), streamed to an MNIST-style IDX pair
    (784 bytes an image: 500,000 images take 392 MB).

    \b
    Then:  edgetailor server pretrain --data OUT/train-images-idx3-ubyte --out ge/"""
    from edgetailor.toolkit.many_writers import simulate_generic

    if out.exists() and not overwrite:
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    progress = ProgressBars()
    images = simulate_generic(out, count, seed=seed, progress=lambda d, n: progress("simulate", d, n),
                              overwrite=overwrite)
    progress.close()
    click.echo(f"{count:,} simulated generic digits in {images} (labels beside it)")


def _compress_help() -> str:
    from edgetailor.server_side.compress.recipe import shipped_compress_recipes

    lines = ["Compress a trained GE with a recipe of stages (pruning, distillation,",
             "quantization) and export it; OUT is a GE checkpoint again, so",
             "`edgetailor export bundle --model OUT` ships the compressed GE.",
             "",
             "Writes OUT/report.txt, report.json and report.png: parameters, file size,",
             "FLOPs, generic accuracy, accuracy after personalization on simulated",
             "users, and batch-1 one-thread latency in each runtime, all against the",
             "fp32 GE measured in the same run.",
             "",
             "\b", "Shipped recipes (--recipe NAME):"]
    lines += [f"  {name:<14} {description}" for name, description in shipped_compress_recipes().items()]
    lines += ["", "Or --recipe path/to/recipe.toml; see server_side/compress/recipe.py for every key."]
    return "\n".join(lines)


@server.command("compress", help=_compress_help())
@click.option("--model", "model", required=True, type=click.Path(exists=True, path_type=Path),
              help="GE checkpoint directory (from `edgetailor server pretrain`).")
@click.option("--recipe", required=True, help="Shipped recipe name (listed above) or a TOML file.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Directory for the compressed GE checkpoint, its exports and the report.")
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Generic data for recovery training and calibration. Default: the built-in digits.")
@click.option("--users", "n_users", type=click.IntRange(0, 50), default=3, show_default=True,
              help="Simulated users to personalize on, fp32 and compressed GE (0 skips it).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_training_options()
def server_compress(model: Path, recipe: str, out: Path, data: Path | None, n_users: int, overwrite: bool,
                    device: str, precision: str, workers: int | None, resume: bool, checkpoint_every: str) -> None:
    from edgetailor.app.compress import compress
    from edgetailor.server_side.compress.recipe import load_compress_recipe
    from edgetailor.server_side.environment import session

    cfg = load_compress_recipe(recipe)
    if out.exists() and not overwrite:
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    env = _training_env(out, device, precision, workers, resume, checkpoint_every, overwrite)
    with session(env):
        dataset = _generic_samples(data, env)
        progress = ProgressBars(enabled=env.is_main)

        def echo(message: str) -> None:
            progress.close()
            if env.is_main:
                click.echo(message, err=True)

        report = compress(model, cfg, out, dataset, n_users=n_users, overwrite=overwrite, progress=progress,
                          echo=echo, env=env)
        progress.close()
    if report is None:
        return
    click.echo("")
    click.echo(report["table"])
    for name, reason in report["not_exported"].items():
        click.echo(f"  {name}: not exported ({reason})")
    for note in report["notes"]:
        click.echo(f"  note: {note}")
    click.echo(f"compressed GE written to {out} ({report['wall_seconds']:.0f}s); "
               f"report: {out / 'report.txt'}, {out / 'report.json'}, {out / 'report.png'}")


@server.group("learngene")
def learngene() -> None:
    """One compact core (the learngene) that initialises vision transformers of
    every depth, one per device class.

    \b
      edgetailor server learngene train   --teacher ge/ --method tleg --out lg/
      edgetailor server learngene expand  --learngene lg/ --depth 4 --out ge4/
      edgetailor server learngene expand  --learngene lg/ --device-profile wearable --out ge-w/
      edgetailor server learngene compare --learngene lg/ --depths 2-8 --out report/

    An expanded model is a GE checkpoint: `server compress` and `export bundle`
    take it like any other."""


def _learngene_recipe(recipe: str | None, **overrides):
    from edgetailor.server_side.learngene.recipe import load_learngene_recipe

    cfg = load_learngene_recipe(recipe)
    for section, key, value in overrides.values():
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    return cfg.validate()


@learngene.command("train")
@click.option("--teacher", required=True, type=click.Path(exists=True, path_type=Path),
              help="GE checkpoint to distil from (any architecture; only its logits are used).")
@click.option("--method", type=click.Choice(list(LEARNGENE_METHODS)), default="tleg", show_default=True,
              help="tleg: layer l = θ_A + (l-1)/(L-1)·θ_B; sws: layers share weights within stages.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Learngene directory to write.")
@click.option("--recipe", help="Learngene recipe TOML ([learngene], [expand], [scratch]); default: the shipped one.")
@click.option("--epochs", type=int, help="Override learngene.epochs.")
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Generic data (.npz, IDX or image folder). Default: the built-in digits.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_training_options()
def learngene_train(teacher: Path, method: str, out: Path, recipe: str | None, epochs: int | None,
                    data: Path | None, overwrite: bool, device: str, precision: str, workers: int | None,
                    resume: bool, checkpoint_every: str) -> None:
    """Train a learngene: an auxiliary transformer whose layers the learngene
    generates, distilled from the teacher's soft predictions on the generic data."""
    from edgetailor.server_side.environment import session
    from edgetailor.server_side.learngene.train import train_learngene

    cfg = _learngene_recipe(recipe, method=("learngene", "method", method), epochs=("learngene", "epochs", epochs))
    if out.exists() and not overwrite:
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    env = _training_env(out, device, precision, workers, resume, checkpoint_every, overwrite)
    with session(env):
        dataset = _generic_samples(data, env)
        progress = ProgressBars(enabled=env.is_main)
        _, meta = train_learngene(teacher, cfg, out, dataset,
                                  progress=lambda e, n: progress("distil learngene", e, n), overwrite=overwrite,
                                  env=env)
        progress.close()
    if not env.is_main:
        return
    click.echo(f"{method.upper()} learngene: {meta.stored_params:,} parameters stored "
               f"({', '.join(meta.components)} + embedding and head); auxiliary model "
               f"(depth {meta.auxiliary['depth']}) {meta.auxiliary['generic_accuracy']:.4f} on the generic "
               f"test set, teacher {meta.teacher['generic_accuracy']:.4f}; {meta.train_seconds:.0f}s; "
               f"saved to {out}")


def _expand_help() -> str:
    from edgetailor.server_side.learngene.recipe import shipped_profiles

    return ("Expand a learngene into a GE of one depth, fine-tune it briefly on the generic data\n"
            "(recipe [expand], default 1 epoch) and save it as a GE checkpoint.\n\n"
            "Give --depth, or --device-profile to pick the deepest model that fits the device's\n"
            "flash, RAM and latency budgets (both: the depth is checked against the profile).\n\n"
            f"\b\nShipped profiles: {', '.join(shipped_profiles())}; or a TOML file with a [device] table\n"
            "(name, flash_kb, ram_kb, latency_ms, macs_per_ms).")


@learngene.command("expand", help=_expand_help())
@click.option("--learngene", "learngene_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="Learngene directory (from `learngene train`).")
@click.option("--depth", type=int, help="Transformer blocks of the model to make.")
@click.option("--device-profile", "profile", help="Shipped profile name or TOML file; picks the depth.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="GE checkpoint directory to write.")
@click.option("--epochs", type=click.IntRange(0), help="Fine-tuning epochs (default: the learngene recipe's [expand]).")
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Generic data for the fine-tune. Default: the built-in digits.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_training_options()
def learngene_expand(learngene_dir: Path, depth: int | None, profile: str | None, out: Path, epochs: int | None,
                     data: Path | None, overwrite: bool, device: str, precision: str, workers: int | None,
                     resume: bool, checkpoint_every: str) -> None:
    from edgetailor.app.learngene import expand_for_device
    from edgetailor.server_side.environment import session
    from edgetailor.server_side.learngene.recipe import load_profile

    if depth is None and profile is None:
        raise EdgetailorError("give --depth N or --device-profile PROFILE",
                              hint="see `edgetailor server learngene expand --help` for the shipped profiles")
    if out.exists() and not overwrite:
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    target = load_profile(profile) if profile else None
    env = _training_env(out, device, precision, workers, resume, checkpoint_every, overwrite)
    with session(env):
        dataset = _generic_samples(data, env)
        progress = ProgressBars(enabled=env.is_main)
        ckpt = expand_for_device(learngene_dir, out, depth, target, data=dataset, epochs=epochs,
                                 progress=lambda e, n: progress("fine-tune", e, n), overwrite=overwrite, env=env)
        progress.close()
    if not env.is_main:
        return
    lg = ckpt.meta.learngene
    params = sum(p.numel() for p in ckpt.model.parameters())
    fitted = f" (deepest that fits {target.name})" if target and depth is None else ""
    click.echo(f"depth {ckpt.meta.depth}{fitted}: {params:,} parameters; generic test accuracy "
               f"{lg['generic_accuracy_at_init']:.4f} from the learngene, {ckpt.meta.generic_accuracy:.4f} "
               f"after {lg['finetune']['epochs']} epoch(s); saved to {out}")
    if lg["device_profile"]:
        e = lg["device_profile"]["estimate"]
        click.echo(f"  on {target.name}: flash {e['flash_kb']:.0f} kB, RAM ~{e['ram_kb']:.0f} kB, "
                   f"{e['macs']:,} MACs" + (f", ~{e['latency_ms']:.2f} ms" if "latency_ms" in e else ""))


def _depth_range(value: str) -> list[int]:
    try:
        if "-" in value:
            low, high = (int(v) for v in value.split("-", 1))
            return list(range(low, high + 1))
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a range like 2-8 or a list like 2,4,8") from None


@learngene.command("compare")
@click.option("--learngene", "learngenes", required=True, multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Learngene directory; repeat to compare methods (same teacher and widths).")
@click.option("--depths", default="2-8", show_default=True, help="Depths to compare: a range (2-8) or a list (2,4,8).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Report directory to write.")
@click.option("--recipe", help="Learngene recipe TOML for the [expand] and [scratch] schedules "
                               "(default: the first learngene's).")
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Generic data. Default: the built-in digits.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_training_options(resumable=False)
def learngene_compare(learngenes: tuple[Path, ...], depths: str, out: Path, recipe: str | None, data: Path | None,
                      overwrite: bool, device: str, precision: str, workers: int | None) -> None:
    """For each depth, the learngene-initialised model (before and after its
    short fine-tune) against the same depth trained from scratch for 1 and for
    [scratch] epochs; parameters stored and training cost for the whole family.
    Writes OUT/report.txt, report.json and report.png."""
    from edgetailor.server_side.environment import session
    from edgetailor.server_side.learngene.compare import compare_family
    from edgetailor.server_side.learngene.recipe import load_learngene_recipe

    if out.exists() and not overwrite:
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    cfg = load_learngene_recipe(recipe) if recipe else None
    env = _training_env(None, device, precision, workers)
    with session(env):
        dataset = _generic_samples(data, env)
        progress = ProgressBars(enabled=env.is_main)
        report = compare_family(list(learngenes), _depth_range(depths), out, cfg, dataset, progress=progress,
                                overwrite=overwrite, env=env)
        progress.close()
    if not env.is_main:
        return
    click.echo(report["table"])
    click.echo(f"report: {out / 'report.txt'}, {out / 'report.json'}, {out / 'report.png'} "
               f"({report['wall_seconds']:.0f}s)")


# --------------------------------------------------------------------- export
@main.group()
def export() -> None:
    """Export trained models as device bundles."""


def _release_options(fn):
    fn = click.option("--expires-days", type=click.FloatRange(min=0, min_open=True),
                      help="Devices refuse the bundle this many days from now (default: never).")(fn)
    fn = click.option("--version", "version", type=click.IntRange(0),
                      help="Release version; devices refuse an older version of the same name. "
                           "Default: the UTC time as YYYYMMDDHHMMSS, which grows with every export.")(fn)
    fn = click.option("--name", help="Release name devices track versions under. Default: OUT's folder name.")(fn)
    fn = click.option("--signing-key", type=click.Path(exists=True, path_type=Path),
                      help="Ed25519 signing.key (or its folder, from `edgetailor keys generate`) that signs the "
                           "manifest; the folder's statements.json (rotations, revocations) rides along.")(fn)
    return fn


FIRMWARE_CODE_BYTES = 40 * 1024
MAX_CLIP_SECONDS = 60      # --input audio: a keyword or command, not a recording


def _trusted_keys_option_for_export(fn):
    return click.option("--trusted-keys", multiple=True, type=click.Path(exists=True, path_type=Path),
                        help="Publisher public key (.pub) or a folder of them; repeatable. The bundle must be signed "
                             "by one of them (or a key they endorse). Without it, a signed bundle's signature is "
                             "checked but not who made it.")(fn)


def _expiry(days: float | None):
    from datetime import datetime, timedelta, timezone

    return datetime.now(timezone.utc) + timedelta(days=days) if days else None


def _key_id(signing_key: Path) -> str:
    from edgetailor.toolkit.signing import load_signing_key

    return load_signing_key(signing_key).public.id[:16]


@export.command("sign")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Exported bundle directory; BUNDLE.zip beside it is rewritten too.")
@_release_options
def export_sign_cmd(bundle_dir: Path, signing_key: Path | None, name: str | None, version: int | None,
                    expires_days: float | None) -> None:
    """Sign an exported bundle (on the machine that holds the key), optionally
    giving it a new release name, version or expiry. Re-hashes every file."""
    from edgetailor.toolkit.bundle import sign_bundle

    if signing_key is None:
        raise EdgetailorError("give --signing-key KEY", hint="make one with `edgetailor keys generate --out keys/`")
    release = sign_bundle(bundle_dir, signing_key, name, version, _expiry(expires_days)).release
    click.echo(f"signed {bundle_dir} ({release.name} version {release.version}) with key {_key_id(signing_key)}")


# ----------------------------------------------------------------------- keys
@main.group()
def keys() -> None:
    """Ed25519 keys that sign bundles, and devices that trust them.

    \b
      edgetailor keys generate --out keys/                       signing.key (0600) + signing.pub
      edgetailor export bundle --model ge/ --out b --signing-key keys/signing.key
      edgetailor device personalize --bundle b.zip --state s/ --samples x.npz --trusted-keys keys/signing.pub
      edgetailor keys rotate --signing-key keys/signing.key --out keys2/ --revoke-old

    A state given --trusted-keys refuses every bundle no trusted key signed.
    After a rotation, bundles signed by the new key carry the old key's
    endorsement, so devices move to the new key by themselves."""


@keys.command("generate")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for signing.key and signing.pub.")
def keys_generate(out: Path) -> None:
    """Make a signing key pair: OUT/signing.key (private, mode 0600; keep it off devices) and OUT/signing.pub
    (give it to devices with --trusted-keys)."""
    from edgetailor.toolkit.signing import generate_key

    public = generate_key(out)
    click.echo(f"key {public.id[:16]}: private {out / 'signing.key'} (mode 0600), public {out / 'signing.pub'}")


@keys.command("rotate")
@click.option("--signing-key", required=True, type=click.Path(exists=True, path_type=Path),
              help="The current signing.key (or its folder).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the new key.")
@click.option("--revoke-old", is_flag=True, help="Also revoke the current key (devices refuse it once they see this).")
def keys_rotate(signing_key: Path, out: Path, revoke_old: bool) -> None:
    """Make a new key endorsed by the current one. Bundles signed with the new
    key carry the endorsement (OUT/statements.json), so devices that trust the
    current key accept them."""
    from edgetailor.toolkit.signing import rotate_key

    public = rotate_key(signing_key, out, revoke_old)
    click.echo(f"new key {public.id[:16]} in {out}, endorsed by the old one" + ("; old key revoked" if revoke_old
                                                                                 else ""))


@keys.command("revoke")
@click.option("--signing-key", required=True, type=click.Path(exists=True, path_type=Path),
              help="A trusted signing.key that signs the revocation.")
@click.option("--key", "revoked", required=True, type=click.Path(exists=True, path_type=Path),
              help="The .pub of the key to revoke.")
def keys_revoke(signing_key: Path, revoked: Path) -> None:
    """Revoke a key: the next bundle signed with --signing-key carries the
    revocation, and devices that see it refuse the revoked key for good."""
    from edgetailor.toolkit.signing import load_public_keys, revoke_key

    found = load_public_keys(revoked)
    if len(found) != 1:
        raise EdgetailorError(f"{revoked} holds {len(found)} public keys; revoke one at a time",
                              hint="give the .pub file of the key to revoke")
    key = found[0]
    revoke_key(signing_key, key)
    click.echo(f"key {key.id[:16]} revoked; bundles signed with {signing_key} from now on carry the revocation")


@export.command("bundle")
@click.option("--model", "model", type=click.Path(exists=True, path_type=Path),
              help="GE checkpoint directory (from `edgetailor server pretrain`, `server compress` or "
                   "`learngene expand`). Or bring your own model with --model-factory.")
@click.option("--model-factory", help="Your own torch model as GE: MODULE:FUNCTION returning the nn.Module "
                                      "(imported from the current folder too), with --weights and --replay. "
                                      "See docs/BRING_YOUR_OWN_MODEL.md.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--model-factory: the trained state_dict (torch.save(model.state_dict(), PATH)).")
@click.option("--replay", "replay_path", type=click.Path(exists=True, path_type=Path),
              help="--model-factory: generic labelled samples the device replays (npz, IDX or a folder per label; "
                   "a few hundred, every label). Their label names are the bundle's unless --labels says.")
@click.option("--labels", help="--model-factory: the model's outputs' label names in order, comma-separated.")
@click.option("--taps", default="auto", show_default=True,
              help="--model-factory: the features LE and GN read: auto, one submodule name for both, or "
                   "LE_TAP,GN_TAP; NAME:input taps a module's input. An unknown name lists the candidates.")
@click.option("--input", "input_kind", default="glyphs", show_default=True,
              help="--model-factory: what the model reads: glyphs (28x28 greyscale images, made by glyph-v1), "
                   "timeseries:CHANNELSxLENGTH (sensor windows, e.g. timeseries:3x64) or "
                   "audio:SAMPLE_RATE[xSECONDS] (mono WAV clips, e.g. audio:16000; the model begins with its "
                   "front-end).")
@click.option("--input-mean", type=float, default=0.0, show_default=True,
              help="--model-factory: the mean the model's inputs were standardised with after scaling to [0, 1] "
                   "(0 for ToTensor alone; Normalize's mean otherwise).")
@click.option("--input-std", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="--model-factory: the std the inputs were standardised with (1 for ToTensor alone).")
@click.option("--generic-test", type=click.Path(exists=True, path_type=Path),
              help="--model-factory: held-out generic samples; GE's accuracy on them goes in the manifest.")
@click.option("--recipe", help="--model-factory: a TOML recipe whose [experts] and [personalize] tables set "
                               "LE's and GN's design, the LE+GN budget and the device's defaults.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to write; BUNDLE.zip is written beside it.")
@click.option("--formats", default=None,
              help="Comma-separated formats the bundle carries, one per runtime: "
                   + ", ".join(f"{f.name} ({f.runtime}: GE + LE/GN "
                               f"{'step' if f.default_training == STEPS else f.default_training} programs"
                               f"{'; a reference for parity checks' if f.reference else ''})" for f in FORMATS.values())
                   + f". Default: {','.join(DEFAULT_FORMATS)}, less those a quantized GE has no model for.")
@click.option("--extra-training", default="",
              help="Comma-separated training kinds to add for parity checks and devices that still run them: "
                   + ", ".join(f"{kind} ({fmt})" for kind, fmt in EXTRA_TRAINING.items())
                   + ". ort-training needs onnxruntime-training installed (in a venv without onnxruntime).")
@click.option("--replay-size", type=click.IntRange(1),
              help="Ship a class-balanced subset of the checkpoint's replay glyphs: the first N // classes of each "
                   "class. Default: all of them. Microcontrollers need fewer (300 glyphs of 28x28 are 235 KB; "
                   "`export firmware` codes them to about 90 KB).")
@click.option("--no-zip", is_flag=True, help="Write only the directory.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_release_options
def export_bundle_cmd(model: Path | None, model_factory: str | None, weights: Path | None,
                      replay_path: Path | None, labels: str | None, taps: str, input_kind: str, input_mean: float,
                      input_std: float,
                      generic_test: Path | None, recipe: str | None, out: Path, formats: str | None,
                      extra_training: str, replay_size: int | None, no_zip: bool, overwrite: bool,
                      signing_key: Path | None, name: str | None, version: int | None,
                      expires_days: float | None) -> None:
    """Write a device bundle: GE in each format, LE's and GN's training step
    as plain inference programs in each format (so any runtime's inference
    build trains them), replay glyphs, and a manifest listing every format's
    files with their sha256. Every program is checked against torch (the step
    programs against torch.optim.AdamW over 100 steps) before the bundle is
    written.

    GE is a checkpoint edgetailor trained (--model), or your own torch model
    (--model-factory pkg.module:build --weights w.pt --replay generic.npz).
    """
    from edgetailor.export.bundle import export_bundle
    from edgetailor.toolkit.formats import check_extra_training, check_formats
    from edgetailor.toolkit.manifest import Manifest
    from edgetailor.toolkit.tables import format_table

    own = {"--weights": weights, "--replay": replay_path, "--labels": labels, "--generic-test": generic_test,
           "--recipe": recipe, "--taps": None if taps == "auto" else taps,
           "--input-mean": input_mean or None, "--input-std": None if input_std == 1.0 else input_std,
           "--input": None if input_kind == "glyphs" else input_kind}
    if (model is None) == (model_factory is None):
        raise EdgetailorError("give --model (a GE checkpoint) or --model-factory (your own torch model), one of them")
    if model is not None and any(v is not None for v in own.values()):
        raise EdgetailorError(f"{', '.join(k for k, v in own.items() if v is not None)} belong(s) with "
                              "--model-factory; a checkpoint carries its own",
                              hint="leave them out, or export your own model with --model-factory")
    if model_factory is not None and replay_path is None:
        raise EdgetailorError("--model-factory needs --replay: generic labelled samples of every label",
                              hint="e.g. 300 of the samples the model was trained on, as an .npz with x and y")
    chosen = check_formats([f.strip() for f in formats.split(",") if f.strip()]) if formats else None
    extra = check_extra_training([k.strip() for k in extra_training.split(",") if k.strip()],
                                 chosen or list(DEFAULT_FORMATS))
    if out.suffix == ".zip":
        out = out.with_suffix("")
    if out.exists() and not overwrite:
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    if signing_key is None:
        click.secho("warning: the bundle is not signed (no --signing-key): a device that pins a key refuses it, and "
                    "one that does not cannot tell it from a tampered copy; make a key with `edgetailor keys "
                    "generate --out keys/`", fg="yellow", err=True)
    common = dict(make_zip=not no_zip, overwrite=overwrite, formats=chosen, extra_training=extra,
                  progress=lambda msg: click.echo(f"  {msg}", err=True), signing_key=signing_key,
                  name=name, version=version, expires=_expiry(expires_days), replay_size=replay_size)
    if model_factory is not None:
        path = _bundle_from_factory(model_factory, weights, replay_path, labels, taps,
                                    _input_spec(input_kind, input_mean, input_std), generic_test, recipe, out, common)
    else:
        path = export_bundle(model, out, **common)
    manifest = Manifest.from_json((path / "manifest.json").read_text())
    rows = [{"format": name, "runtime": entry.runtime, "files": len(entry.files),
             "KiB": sum((path / f).stat().st_size for f in entry.files) / 1024}
            for name, entry in manifest.formats.items()]
    click.echo(format_table(rows, [("format", "format", ""), ("runtime", "runtime", ""), ("files", "files", "d"),
                                   ("KiB", "KiB", ",.0f")]))
    ge, le, gn = manifest.global_expert, manifest.local_expert, manifest.gating_network
    click.echo(f"bundle written to {path}" + ("" if no_zip else f" and {path}.zip"))
    release = manifest.release
    click.echo(f"  {release.name} version {release.version}"
               + (f", expires {release.expires}" if release.expires else "")
               + (f"; signed by key {_key_id(signing_key)}" if signing_key else "; unsigned"))
    click.echo(f"  GE {ge.params:,} params, {ge.macs:,} MACs; LE+GN {le.params + gn.params:,} params "
               f"({(le.params + gn.params) / ge.params:.2%}), {le.macs + gn.macs:,} MACs "
               f"({(le.macs + gn.macs) / ge.macs:.2%})")


def _input_spec(kind: str, mean: float, std: float):
    """``--input``: glyphs, timeseries:CHANNELSxLENGTH or audio:SAMPLE_RATE[xSECONDS]."""
    from edgetailor.toolkit.input_spec import InputSpec

    if kind == "glyphs":
        return InputSpec.for_glyphs(mean, std)
    name, _, size = kind.partition(":")
    if name == "audio":
        rate, _, seconds = size.partition("x")
        try:
            length = float(seconds or 1.0)
        except ValueError:
            length = float("nan")
        if not rate.isdigit() or not 0.1 <= length <= MAX_CLIP_SECONDS:
            raise EdgetailorError(f"--input {kind!r} is not audio:SAMPLE_RATE[xSECONDS] with 0.1 to "
                                  f"{MAX_CLIP_SECONDS} seconds",
                                  hint="e.g. --input audio:16000 for one-second clips at 16 kHz")
        if mean or std != 1.0:
            raise EdgetailorError("--input-mean and --input-std do not apply to audio: clips reach the model in "
                                  "[-1, 1], and its front-end makes the features", hint="leave them out")
        try:
            return InputSpec.for_audio(int(rate), length)
        except ValueError as exc:
            raise EdgetailorError(f"--input {kind!r}: {exc}") from None
    channels, _, length = size.partition("x")
    if name != "timeseries" or not channels.isdigit() or not length.isdigit():
        raise EdgetailorError(f"--input {kind!r} is not glyphs, timeseries:CHANNELSxLENGTH or audio:SAMPLE_RATE",
                              hint="e.g. --input timeseries:3x64 for 3-axis windows of 64 steps")
    try:
        return InputSpec.for_timeseries(int(channels), int(length), mean, std)
    except ValueError as exc:
        raise EdgetailorError(f"--input {kind!r}: {exc}") from None


def _bundle_from_factory(factory: str, weights: Path | None, replay_path: Path, labels: str | None, taps: str,
                         spec, generic_test: Path | None, recipe: str | None, out: Path, common: dict) -> Path:
    """``export bundle --model-factory``: the CLI face of ``bundle_from_model``."""
    import torch

    from edgetailor.export.user_model import bundle_from_model, load_model_factory
    from edgetailor.toolkit.config import load_recipe
    from edgetailor.toolkit.modalities import get_modality

    chosen_recipe = load_recipe(recipe) if recipe else None
    modality = get_modality(spec.modality)
    names = [n.strip() for n in labels.split(",")] if labels else None
    replay = modality.load(replay_path, spec, names)
    test = modality.load(generic_test, spec, replay.label_names) if generic_test else None
    model = load_model_factory(factory, weights)
    tap_choice: str | list[str] = taps if taps == "auto" or "," not in taps else [t.strip() for t in taps.split(",")]
    example = torch.from_numpy(spec.normalize(replay.images[:4]))
    return bundle_from_model(model, example, replay.label_names, replay, out, taps=tap_choice, input_spec=spec,
                             experts=chosen_recipe.experts if chosen_recipe else None,
                             personalize=chosen_recipe.personalize if chosen_recipe else None,
                             generic_test=test, **common)


@export.command("firmware")
@click.option("--bundle", required=True, type=click.Path(exists=True, path_type=Path),
              help="Bundle directory or .zip (from `edgetailor export bundle`; it must carry the onnx format).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="C project directory to write.")
@click.option("--int8/--fp32", "int8", default=None,
              help="Insist on the int8 kernels (a GE from `server compress --recipe int8`) or the float ones. "
                   "Default: follow the bundle's GE.")
@click.option("--max-samples", type=click.IntRange(1), default=200, show_default=True,
              help="The most samples one on-device personalization takes (ET_MAX_SAMPLES).")
@_trusted_keys_option_for_export
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export_firmware_cmd(bundle: Path, out: Path, int8: bool | None, max_samples: int, trusted_keys: tuple[Path, ...],
                        overwrite: bool) -> None:
    """Write a C project that runs the bundle on a microcontroller: GE's
    inference and LE/GN personalization in plain C99, no malloc.

    \b
    OUT/libedgetailor/   the C library (the same math as the Python device runtime)
    OUT/example/         a host program: personalize on TRAIN, evaluate on TEST
    OUT/cortex-m4/       the same on a Cortex-M4, run under QEMU (`make qemu`)
    OUT/model/           edgetailor_model.c/.h: the bundle's GE layers, LE's and
                         GN's initial weights, defaults and replay glyphs as const
                         data; model.json summarises them

    \b
    Then, with sample files from `edgetailor export firmware-samples`:
      make -C OUT host
      cd OUT && ./example-host TRAIN.etsm TEST.etsm
      make -C OUT qemu TRAIN=TRAIN.etsm TEST=TEST.etsm

    GE must be a LeNet-style chain of Conv, Relu, MaxPool, Flatten and Gemm,
    fp32 or int8 (QDQ); the layers are checked against onnxruntime on the
    replay glyphs before anything is written."""
    from edgetailor.export.firmware import export_firmware
    from edgetailor.toolkit.tables import format_table

    if out.exists() and not overwrite:
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    report = export_firmware(bundle, out, int8=int8, trusted_keys=list(trusted_keys), max_samples=max_samples,
                             overwrite=overwrite, progress=lambda msg: click.echo(f"  {msg}", err=True))
    for note in report.notes:
        click.secho(f"note: {note}", fg="yellow", err=True)
    click.echo(format_table(report.rows(), [("part", "flash", "<"), ("bytes", "bytes", ",d")]))
    click.echo(f"C project written to {out} (bundle {report.bundle_id}, {'int8' if report.quantized else 'fp32'} "
               f"GE; largest activation pair {report.max_activation:,} values)")
    # the library, the example and libm add about 40 KB of code on a Cortex-M4 (benchmarks/firmware.py: 124 KB
    # for the int8 LeNet-5's 84 KB of model data)
    image_kb = (report.flash_bytes + FIRMWARE_CODE_BYTES) / 1024
    click.echo(f"  a Cortex-M4 image will take about {image_kb:,.0f} KB of flash (model data plus ~40 KB of code)")
    if image_kb > 256:
        flash_kb = 1 << (int(image_kb) - 1).bit_length()   # the next power of two, as parts come
        click.secho(f"  that is over `make cortex-m4`'s default 256 KB: link with FLASH_KB={flash_kb}"
                    + ("" if report.quantized else ", or make an int8 GE (`edgetailor server compress --recipe int8`), "
                                                       "4x smaller"), fg="yellow", err=True)
    click.echo(f"  next: make -C {out} host && {out}/example-host TRAIN.etsm TEST.etsm; "
               f"make -C {out} qemu TRAIN=$PWD/TRAIN.etsm TEST=$PWD/TEST.etsm (absolute paths: make -C runs in "
               f"{out}); sample files come from `edgetailor export firmware-samples`")


@export.command("firmware-samples")
@click.option("--samples", required=True, type=click.Path(exists=True, path_type=Path),
              help="Labelled samples: .npz (x, y), MNIST/EMNIST IDX images file, or a folder per label (each image is "
                   "prepared by the bundle's preprocessing, as `device personalize` prepares it).")
@click.option("--bundle", required=True, type=click.Path(exists=True, path_type=Path),
              help="The bundle the firmware was exported from: its preprocessing, input size and labels.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Sample file to write, e.g. train.etsm.")
@click.option("--skip-bad", is_flag=True, help="Leave out blank or unreadable images (each named in a warning) "
                                                "instead of refusing the whole set.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_trusted_keys_option_for_export
def export_firmware_samples_cmd(samples: Path, bundle: Path, out: Path, skip_bad: bool, overwrite: bool,
                                trusted_keys: tuple[Path, ...]) -> None:
    """Write samples as the firmware reads them (et_samples_open): a 24-byte
    header ("ETSM", version, height, width, labels, count, CRC-32, and a CRC-32
    of the bundle's label names, so a file for another bundle is refused), then one
    record per sample of [label index][height x width pixels], already
    prepared, so the device does no image processing.

    \b
      edgetailor export firmware-samples --samples mine.npz --bundle b.zip --out train.etsm
      edgetailor export firmware-samples --samples test.npz --bundle b.zip --out test.etsm
      make -C OUT host && cd OUT && ./example-host ../train.etsm ../test.etsm"""
    from edgetailor.export.firmware_samples import export_firmware_samples

    if out.exists() and not overwrite:
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    report = export_firmware_samples(samples, bundle, out, trusted_keys=list(trusted_keys), skip_bad=skip_bad)
    for note in report.notes:
        click.secho(f"warning: {note}", fg="yellow", err=True)
    counts = ", ".join(f"{label}: {n}" for label, n in report.class_counts.items() if n)
    click.echo(f"wrote {out} ({report.count} samples of {report.height}x{report.width}, {report.size:,} bytes; "
               f"{counts})")


# --------------------------------------------------------------------- device
@main.group()
def device() -> None:
    """On-device runtime: personalise and evaluate (needs no torch)."""


BACKEND_HELP = ("Runtime: ort (onnxruntime), litert or executorch, each training with the bundle's step programs; "
                "ort-training or executorch-training (the runtimes' own training packages, for parity); torch "
                "(reference). Default: the best installed one the bundle carries (see `edgetailor device info`).")


SKIP_BAD_HELP = ("Leave out blank or unreadable images (each named in a warning) instead of refusing the whole "
                 "set.")


TRUSTED_KEYS_HELP = ("Publisher public key (.pub) or a folder of them; repeatable. Pinned into the state: from then "
                     "on it opens only bundles these keys (or keys they endorse) signed.")


def _load_for(runtime, samples: Path, skip_bad: bool, label_names: bool = True):
    """The samples at PATH, prepared by the bundle's own preprocessing; what was left out is warned about.
    Without ``label_names`` the labels are not needed (predict)."""
    data = runtime.modality.load(samples, runtime.manifest.input, runtime.labels if label_names else None, skip_bad,
                                 labelled=label_names)
    for note in data.notes:
        click.secho(f"warning: {note}", fg="yellow", err=True)
    return data


def _open_runtime(bundle: Path, state: Path, backend: str | None = None, trusted_keys: tuple[Path, ...] = (),
                  read_only: bool = False, quiet: bool = False):
    """The device runtime, its warnings (unsigned bundle, read-only or damaged state) printed on stderr."""
    from edgetailor.device.runtime import DeviceRuntime

    runtime = DeviceRuntime.open(bundle, state, backend, trusted_keys=list(trusted_keys) or None, read_only=read_only)
    if not quiet:
        for warning in runtime.warnings:
            click.secho(f"warning: {warning}", fg="yellow", err=True)
    return runtime


def _trusted_keys_option(fn):
    return click.option("--trusted-keys", multiple=True, type=click.Path(exists=True, path_type=Path),
                        help=TRUSTED_KEYS_HELP)(fn)


def _bundle_state_options(fn):
    fn = _trusted_keys_option(fn)
    fn = click.option("--skip-bad", is_flag=True, help=SKIP_BAD_HELP)(fn)
    fn = click.option("--backend", default=None, help=BACKEND_HELP)(fn)
    fn = click.option("--samples", required=True, type=click.Path(exists=True, path_type=Path),
                      help="Labelled samples: .npz (x, y), MNIST/EMNIST IDX images file, or a folder per label "
                           "(PNG/JPEG photos or scans of any size; each image is prepared by the bundle's "
                           "preprocessing).")(fn)
    fn = click.option("--state", required=True, type=click.Path(path_type=Path),
                      help="State directory (SQLite database of samples and personalizations).")(fn)
    fn = click.option("--bundle", required=True, type=click.Path(exists=True, path_type=Path),
                      help="Bundle directory or .zip.")(fn)
    return fn


@device.command("personalize")
@_bundle_state_options
@click.option("--max-seconds", type=float, help="Stop training after this long (keeps what was learnt).")
@click.option("--epochs", type=int, help="Override the bundle's personalize.le_epochs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def device_personalize(bundle: Path, state: Path, samples: Path, backend: str, skip_bad: bool,
                       trusted_keys: tuple[Path, ...], max_seconds: float | None, epochs: int | None,
                       as_json: bool) -> None:
    """Add the samples at PATH to the state and train the Local Expert and
    Gating Network on all stored samples. The previous personalization stays
    in use until the new one is committed, and it is committed only if no
    other process changed the samples meanwhile (else it trains again)."""
    from edgetailor.device.mixture import describe_learning
    from edgetailor.toolkit.memory import peak_rss_mb

    overrides = {k: v for k, v in {"max_seconds": max_seconds, "le_epochs": epochs}.items() if v is not None}
    with _open_runtime(bundle, state, backend, trusted_keys) as runtime:
        added = runtime.add_dataset(_load_for(runtime, samples, skip_bad))   # not kept: personalize reads the store
        progress = ProgressBars(enabled=not as_json)
        report = runtime.personalize(overrides, progress)
        progress.close()
        result = {"added": added, "stored": runtime.sample_count(), **report,
                  "peak_rss_mb": round(peak_rss_mb(), 1), "torch_imported": "torch" in sys.modules}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"added {added} new samples ({result['stored']} stored); personalized with {report['backend']} "
                   f"in {report['seconds']:.2f}s ({report['le_steps']} LE steps, {report['gn_steps']} GN steps); "
                   f"peak RSS {result['peak_rss_mb']:.0f} MB")
        click.echo(f"learned: {describe_learning(report['learned'])}")
        if report.get("superseded"):
            click.echo("another process committed a personalization of the same, newer samples first; it is in use")
        if report.get("other_samples_ignored"):
            click.secho(f"warning: {report['other_samples_ignored']} stored samples are another kind of input than "
                        "this bundle reads (from another bundle with the same labels) and were left out",
                        fg="yellow", err=True)
        if report.get("damaged_samples_skipped"):
            click.secho(f"warning: {report['damaged_samples_skipped']} damaged samples were skipped; "
                        "`edgetailor device repair` removes them", fg="yellow", err=True)


@device.command("evaluate")
@_bundle_state_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (accuracy, n, experts, ...).")
def device_evaluate(bundle: Path, state: Path, samples: Path, backend: str, skip_bad: bool,
                    trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Accuracy of the device's model (GE alone until personalized) on the samples at PATH.
    Writes nothing, so it works on a full disk or a read-only state."""
    with _open_runtime(bundle, state, backend, trusted_keys, read_only=True) as runtime:
        result = runtime.evaluate_dataset(_load_for(runtime, samples, skip_bad))
        problem = runtime.status()["personalization_problem"]
    if as_json:
        click.echo(json.dumps({**result, "personalization_problem": problem}))
        return
    if problem:
        click.secho(f"warning: the stored personalization is not in use: {problem}", fg="yellow", err=True)
    click.echo(f"accuracy {result['accuracy']:.4f} on {result['n']} samples "
               f"({'personalized' if result['personalized'] else 'GE only'}); "
               f"answered by GE {result['experts']['GE']}, LE {result['experts']['LE']}; "
               f"GE alone would score {result['ge_only_accuracy']:.4f}")


@device.command("predict")
@click.option("--bundle", required=True, type=click.Path(exists=True, path_type=Path), help="Bundle directory or .zip.")
@click.option("--state", required=True, type=click.Path(path_type=Path), help="State directory.")
@click.option("--samples", required=True, type=click.Path(exists=True, path_type=Path),
              help="Images: an .npz with x (y not needed), an IDX images file (labels file not needed), or a folder "
                   "of images (flat, or one sub-folder per label; labels are ignored).")
@click.option("--backend", default=None, help=BACKEND_HELP)
@click.option("--skip-bad", is_flag=True, help=SKIP_BAD_HELP)
@_trusted_keys_option
def device_predict(bundle: Path, state: Path, samples: Path, backend: str, skip_bad: bool,
                   trusted_keys: tuple[Path, ...]) -> None:
    """Print one JSON line per image: label, probability, and which expert answered.
    Writes nothing, so it works on a full disk or a read-only state."""
    with _open_runtime(bundle, state, backend, trusted_keys, read_only=True) as runtime:
        prediction = runtime.predict_dataset(_load_for(runtime, samples, skip_bad, label_names=False))
    for i in range(len(prediction)):
        click.echo(json.dumps({"label": prediction.labels[i],
                               "probability": round(float(prediction.probabilities[i].max()), 4),
                               "expert": prediction.experts[i], "gate": round(float(prediction.gate[i]), 4)}))


@device.command("info")
@click.option("--bundle", type=click.Path(exists=True, path_type=Path),
              help="Also say which backends can run this bundle (and verify its files).")
@click.option("--state", type=click.Path(path_type=Path),
              help="With --bundle: also report this state's samples and personalization (and why it is not in "
                   "use, if it was dropped).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_trusted_keys_option
def device_info(bundle: Path | None, state: Path | None, as_json: bool, trusted_keys: tuple[Path, ...]) -> None:
    """List the device backends: installed or not (and how to install),
    what each runs, and which one `--backend auto` picks."""
    from edgetailor.device.backends import BACKENDS, PREFERENCE, can_train, runtime_version, usable_backends
    from edgetailor.device.runtime import DeviceRuntime
    from edgetailor.toolkit.bundle import Bundle
    from edgetailor.toolkit.tables import format_table

    if state is not None and bundle is None:
        raise EdgetailorError("--state needs --bundle", hint="give the bundle the state was personalized with")

    opened = Bundle.open(bundle) if bundle else None
    try:
        usable = usable_backends(opened) if opened else None
        rows = []
        for name in PREFERENCE:
            info = BACKENDS[name]
            row = {"backend": name, "installed": runtime_version(name), "format": info.format,
                   "training": info.training, "description": info.description,
                   "install": f"pip install '{info.requirement}'"}
            if opened:
                row["bundle"] = ("damaged: " + opened.damaged[info.format] if info.format in opened.damaged else
                                 "no " + info.format + " files" if info.format not in opened.formats else
                                 "not installed" if not row["installed"] else
                                 "runs GE and trains" if can_train(opened, name) else
                                 f"runs GE (no {'step' if info.training == STEPS else info.training} programs)")
            rows.append(row)
        if opened:
            auto = next((n for n in usable if can_train(opened, n)), usable[0] if usable else None)
        else:
            auto = next((r["backend"] for r in rows if r["installed"]), None)
        status = None
        if opened and state is not None:
            with DeviceRuntime.open(opened, state, trusted_keys=list(trusted_keys) or None,
                                    read_only=True) as runtime:  # closes the bundle too
                status = runtime.status()
                for warning in runtime.warnings:
                    click.secho(f"warning: {warning}", fg="yellow", err=True)
    finally:
        if opened:
            opened.close()
    if as_json:
        click.echo(json.dumps({"backends": rows, "auto": auto, **({"state": status} if status else {})}))
        return
    for row in rows:
        row["status"] = f"installed {row['installed']}" if row["installed"] else f"not installed ({row['install']})"
    columns = [("backend", "backend", "<"), ("status", "installed", "<"), ("description", "runs", "<")]
    click.echo(format_table(rows, columns + ([("bundle", "this bundle", "<")] if bundle else [])))
    click.echo(f"auto picks: {auto or 'nothing (install a backend)'}")
    if status:
        click.echo(f"state {state}: {status['samples']} samples stored; "
                   + ("personalized" if status["personalized"] else "not personalized (GE answers alone)"))
        if status["personalization_problem"]:
            click.secho(f"  the stored personalization is not in use: {status['personalization_problem']}",
                        fg="yellow")


@device.command("export-personalized")
@click.option("--bundle", required=True, type=click.Path(exists=True, path_type=Path), help="Bundle directory or .zip.")
@click.option("--state", required=True, type=click.Path(exists=True, path_type=Path),
              help="State directory holding the personalization.")
@click.option("--format", "fmt", default="onnx", show_default=True,
              help="Program format: one the bundle has a personalized-model template for (onnx, tflite, executorch; "
                   "a quantized GE: onnx).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="File to write, e.g. model.onnx.")
@click.option("--backend", default=None, help=BACKEND_HELP)
@_trusted_keys_option
def device_export_personalized(bundle: Path, state: Path, fmt: str, out: Path, backend: str | None,
                               trusted_keys: tuple[Path, ...]) -> None:
    """Write the personalized model (GE + LE + GN + routing, trained weights
    folded in) as one inference program: an app that only predicts runs it
    with one call on its own runtime. Input `image` (N, 1, H, W), normalised
    as the bundle's input spec says; outputs `logits`, `probabilities`,
    `gate` and `expert` (1 where LE answered), as `device predict` answers."""
    with _open_runtime(bundle, state, backend, trusted_keys, read_only=True) as runtime:
        path = runtime.export_personalized(out, fmt)
        spec = runtime.manifest.input
    click.echo(f"wrote {path} ({path.stat().st_size / 1024:,.0f} KiB): input 'image' {list(spec.shape)}, "
               f"(pixel/255 - {spec.mean}) / {spec.std}; outputs logits, probabilities, gate, expert")


@device.command("reset")
@click.option("--bundle", required=True, type=click.Path(exists=True, path_type=Path), help="Bundle directory or .zip.")
@click.option("--state", required=True, type=click.Path(path_type=Path), help="State directory.")
@click.option("--delete-samples", is_flag=True, help="Also delete every stored sample.")
@click.option("--keep-samples", is_flag=True, hidden=True, help="The default since 0.2 (kept for old scripts).")
@_trusted_keys_option
def device_reset(bundle: Path, state: Path, delete_samples: bool, keep_samples: bool,
                 trusted_keys: tuple[Path, ...]) -> None:
    """Forget the personalization: back to GE alone. The stored samples stay
    (personalize again any time) unless --delete-samples. Works on a damaged
    state too: it is repaired first, keeping every readable sample."""
    from edgetailor.device.store import DamagedState, repair_state

    if delete_samples and keep_samples:
        raise EdgetailorError("--delete-samples and --keep-samples contradict each other", hint="give one")
    try:
        with _open_runtime(bundle, state, None, trusted_keys) as runtime:
            runtime.reset(keep_samples=not delete_samples)
            kept = runtime.sample_count()
    except DamagedState as exc:
        click.secho(f"warning: {exc.message}; repairing the state first", fg="yellow", err=True)
        click.echo(f"repaired: {repair_state(state, keep_personalizations=False).describe()}")
        with _open_runtime(bundle, state, None, trusted_keys, quiet=True) as runtime:
            runtime.reset(keep_samples=not delete_samples)
            kept = runtime.sample_count()
    click.echo("personalization forgotten" + (" and samples deleted" if delete_samples else f"; {kept} samples kept"))


@device.command("repair")
@click.option("--state", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="State directory whose database is damaged.")
def device_repair(state: Path) -> None:
    """Salvage a damaged state: copy every readable sample, personalization,
    trusted key and accepted version into a fresh database, and keep the
    damaged one beside it (state.sqlite.damaged-TIME). Samples and
    personalizations that no longer match their sha256 are left out."""
    from edgetailor.device.store import repair_state

    click.echo(f"repaired {state}: {repair_state(state).describe()}")


# --------------------------------------------------------------------- demo
@main.command("demo")
@click.option("--task", type=click.Choice(["digits", "keywords"]), default="digits", show_default=True,
              help="digits: handwriting, edgetailor's own GE on the built-in digits. keywords: spoken 'zero' to "
                   "'nine', a DS-CNN brought in as your own model and personalized for accents it never heard "
                   "(needs espeak-ng and flite: apt-get install espeak-ng flite).")
@click.option("--out", default=None, type=click.Path(path_type=Path),
              help="Working directory (GE, bundle, users' states, report). Default: edgetailor-demo, or "
                   "edgetailor-demo-keywords.")
@click.option("--users", "n_users", default=5, show_default=True, type=click.IntRange(1, 40))
@click.option("--samples-per-class", default=10, show_default=True, type=click.IntRange(1, 10),
              help="User samples per class to personalize on.")
@click.option("--recipe", default="default", show_default=True, help="Recipe name or TOML path.")
@click.option("--fast", is_flag=True, help="Short training everywhere (a smoke run, not the real figures).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--model", "model", type=click.Path(exists=True, path_type=Path),
              help="Use this GE checkpoint (e.g. from `server learngene expand` or `server compress`) "
                   "instead of pretraining one; it must have been trained on the built-in digits.")
@_training_options(resumable=False)
def demo_cmd(task: str, out: Path | None, n_users: int, samples_per_class: int, recipe: str, fast: bool, seed: int,
             model: Path | None, device: str, precision: str, workers: int | None) -> None:
    """The whole loop on built-in data: pretrain GE -> export a bundle ->
    personalize on simulated users (each in its own torch-free device
    process) -> one table against fine-tuning baselines, as JSON and PNG.
    --task keywords runs it for spoken keywords with a model brought in as
    a user's own (docs/BRING_YOUR_OWN_MODEL.md)."""
    if task == "keywords":
        from edgetailor.app.keywords import run_keyword_demo
        from edgetailor.toolkit.speech import SynthesizerMissing, synthesizers_missing

        if model is not None or recipe != "default":
            raise EdgetailorError("--model and --recipe belong to the digits demo; the keyword demo trains its "
                                  "own DS-CNN")
        why = synthesizers_missing()
        if why:
            raise SynthesizerMissing(f"the keyword demo synthesizes its speech offline, and {why}")
        run_keyword_demo(out or Path("edgetailor-demo-keywords"), n_users=n_users, samples_per_word=samples_per_class,
                         epochs=8 if fast else 30, seed=seed, echo=click.echo)
        return
    from edgetailor.app.demo import run_demo
    from edgetailor.server_side.environment import session

    env = _training_env(None, device, precision, workers)
    with session(env):
        run_demo(out or Path("edgetailor-demo"), recipe="fast" if fast and recipe == "default" else recipe,
                 n_users=n_users, samples_per_class=samples_per_class, seed=seed,
                 echo=click.echo if env.is_main else (lambda _m: None), model_dir=model, env=env)


if __name__ == "__main__":
    main()

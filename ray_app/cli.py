"""`ray-app`: the command line. Thin: parse, load config, call one function, report."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console
from rich.markup import escape

from ray_app.errors import UserError
from ray_app.secrets import redact

ADDRESS_HELP = ("Ray cluster: absent = start a local one; 'auto' = the cluster this machine "
                "belongs to; ray://HOST:10001 = Ray client; http://HOST:8265 = submit as a "
                "Ray job to that dashboard and follow its logs.")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config; absent = the built-in quickstart.")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY.PATH=VALUE", help="Override a config key, e.g. train.lr=1e-4.")
    parser.add_argument("--output", help="Output folder (adapter, rejects, run_summary.json).")
    parser.add_argument("--address", help=ADDRESS_HELP)
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local cluster (default: all).")
    parser.add_argument(
        "--storage", metavar="PATH_OR_URI",
        help="With --address http://...: where relative run.storage_path and run.output_dir "
        "go on the cluster (a path every node mounts, or s3://...); default RAY_APP_STORAGE, "
        "or this folder when the cluster runs on this machine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show Ray's own logs.")


def build_parser() -> argparse.ArgumentParser:
    from ray_app.config import describe_keys

    parser = argparse.ArgumentParser(
        prog="ray-app", description="Fine-tune open LLMs with LoRA on a Ray cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="Fine-tune a LoRA adapter (no CONFIG: the built-in quickstart).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys (section: key (default): meaning):\n" + describe_keys(),
    )
    _config_args(train)
    train.set_defaults(func=cmd_train)
    tune = sub.add_parser(
        "tune", help="Search hyperparameters: one training run per trial over tune.space "
        "(Ray Tune); writes best_config.yaml, tune_summary.json and trials.png.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys (section: key (default): meaning):\n" + describe_keys(),
    )
    _config_args(tune)
    tune.add_argument("--resume", action="store_true",
                      help="Continue the study of this config (run.name) where it stopped; "
                      "finished trials are kept.")
    tune.set_defaults(func=cmd_tune)
    data = sub.add_parser("data", help="Read, validate and tokenize the data; print the report.")
    _config_args(data)
    data.set_defaults(func=cmd_data)
    submit = sub.add_parser(
        "submit", help="Run train, data or tune as a Ray job (Jobs API): uploads the config, prints "
        "the job id and dashboard URL, follows the logs, exits with the job's status.")
    _config_args(submit)
    submit.add_argument("--command", choices=["train", "data", "tune"], default="train",
                        help="What the job runs (default: train).")
    submit.set_defaults(func=cmd_submit)
    register_eval(sub)
    register_merge(sub)
    register_estimate(sub)
    from ray_app.k8s.cli import register as register_k8s

    register_k8s(sub)
    return parser


def _load(args):
    from ray_app.api import load_config
    from ray_app.config import STORAGE_ENV, resolve_run_path

    cfg = load_config(args.config, args.overrides)  # validated before Ray starts
    if args.output:
        cfg.run.output_dir = resolve_run_path(args.output, "--output", os.environ.get(STORAGE_ENV))
    return cfg


def cmd_train(args, console: Console) -> int:
    from ray_app import api
    from ray_app.extras import check_packages
    from ray_app.ray_session import is_dashboard_address

    cfg = _load(args)
    check_packages(cfg)  # a missing package is named before Ray starts, too
    if is_dashboard_address(args.address):
        return _submit_and_follow(args, console, "train")
    result = api.train(cfg, args.address, num_cpus=args.num_cpus, console=console,
                       verbose=args.verbose)
    result.render(console)
    return 0 if result.succeeded else 1


def cmd_tune(args, console: Console) -> int:
    from ray_app import api
    from ray_app.ray_session import is_dashboard_address
    from ray_app.tune.study import check_study

    cfg = _load(args)
    check_study(cfg)  # search space, packages, optuna: before Ray starts
    if is_dashboard_address(args.address):
        return _submit_and_follow(args, console, "tune")
    summary = api.tune(cfg, args.address, resume=args.resume, num_cpus=args.num_cpus,
                       console=console, verbose=args.verbose)
    if summary["status"] != "finished":
        return 130
    return 0 if summary["best"] else 1


def cmd_submit(args, console: Console) -> int:
    args.address = args.address or os.environ.get("RAY_ADDRESS")
    return _submit_and_follow(args, console, args.command)


def _submit_and_follow(args, console: Console, command: str) -> int:
    """Submits the run as a Ray job, follows its logs, returns the job's exit status."""
    from ray_app import api
    from ray_app.submit import TERMINAL, follow_logs, run_coroutine

    job = api.submit(args.config, args.address, command=command, overrides=args.overrides,
                     storage=args.storage, output=args.output,
                     resume=getattr(args, "resume", False), console=console)
    try:
        status = run_coroutine(follow_logs(job.client, job.job_id, console))
    except KeyboardInterrupt:
        console.print(f"Stopped following job {job.job_id}; the job keeps running on the "
                      f"cluster. Follow it again: ray job logs {job.job_id} --follow --address "
                      f"{job.address}. Stop it: ray job stop {job.job_id} --address "
                      f"{job.address}.", highlight=False, soft_wrap=True)
        return 130
    console.print(f"Job {job.job_id} finished: {status}")
    return TERMINAL.get(status, 1)


def cmd_data(args, console: Console) -> int:
    from ray_app import api
    from ray_app.data.report import render_report
    from ray_app.ray_session import is_dashboard_address

    cfg = _load(args)
    if is_dashboard_address(args.address):
        return _submit_and_follow(args, console, "data")
    prepared = api.prepare_data(cfg, args.address, num_cpus=args.num_cpus, console=console,
                                verbose=args.verbose)
    rejects = cfg.output_path() / "rejects"
    render_report(prepared.report, console, cached=prepared.cached, rejects_dir=rejects)
    console.print(f"Tokenized records: {prepared.path}")
    return 0


def register_eval(sub) -> None:
    evaluate = sub.add_parser(
        "eval", help="Compare the base model and base + adapter on the eval split: perplexity, "
        "and ROUGE-L, BLEU and exact match of generated answers. Writes <output>/eval/.")
    _config_args(evaluate)
    evaluate.add_argument("--adapter", required=True,
                          help="Adapter folder of a run, e.g. outputs/<run.name>/final.")
    evaluate.set_defaults(func=cmd_eval)


def cmd_eval(args, console: Console) -> int:
    from ray_app import api
    from ray_app.export.evaluate import render_results

    cfg = _load(args)
    results = api.evaluate(cfg, args.adapter, args.address, num_cpus=args.num_cpus,
                           console=console, verbose=args.verbose)
    render_results(results, console, cfg.output_path() / "eval")
    return 0


def register_merge(sub) -> None:
    merge = sub.add_parser(
        "merge", help="Merge an adapter into its base weights: a plain transformers model "
        "(safetensors shards, config, tokenizer) for vLLM or any other server, verified "
        "against base + adapter.")
    merge.add_argument("--adapter", required=True,
                       help="Adapter folder of a run, e.g. outputs/<run.name>/final.")
    merge.add_argument("--out", required=True, help="New folder for the merged model.")
    merge.add_argument("--base", help="Base model folder or hub id; default: the "
                       "base_model_name_or_path in the adapter's adapter_config.json.")
    merge.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       default="auto", help="Dtype of the merged weights; auto = the base "
                       "checkpoint's own (float32 if it names none).")
    merge.add_argument("--max-shard-size", default="5GB",
                       help="Largest safetensors shard (default: 5GB).")
    merge.add_argument("--tolerance", type=float,
                       help="Allowed max |logit difference| between the merged model and base "
                       "+ adapter, as a share of the largest |logit| (default: 1e-4 for "
                       "float32, 3e-2 for bfloat16, 1e-2 for float16).")
    merge.set_defaults(func=cmd_merge)


def cmd_merge(args, console: Console) -> int:
    from ray_app import api

    result = api.merge(args.adapter, args.out, args.base, args.dtype, args.max_shard_size,
                       args.tolerance, console)
    shards = sum(name.endswith(".safetensors") for name in result.files)
    console.print(f"Merged {args.adapter} into {result.base} ({result.dtype}): {result.out}\n"
                  f"Wrote {shards} safetensors shard(s), config.json and the tokenizer.\n"
                  f"Check passed: max |logit difference| to base + adapter "
                  f"{result.max_abs_diff:.3g} (allowed {result.allowed:.3g}).", highlight=False)
    return 0


def register_estimate(sub) -> None:
    est = sub.add_parser(
        "estimate", help="Per-GPU memory of a training run (weights, adapter, gradients, "
        "optimizer, activations, logits, buffers) and the settings that make it fit; reads "
        "only the model's config, no weights, no GPU needed.")
    est.add_argument("config", nargs="?", help="YAML config; absent = the built-in quickstart.")
    est.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY.PATH=VALUE", help="Override a config key, e.g. lora.r=64.")
    est.add_argument("--model", help="Hub id, local folder or config.json; default: the "
                     "config's model.name_or_path.")
    est.add_argument("--method", choices=["full", "lora", "qlora"],
                     help="Default: qlora when model.quantization is nf4, else lora.")
    est.add_argument("--strategy", choices=["ddp", "fsdp", "deepspeed"],
                     help="Default: scaling.strategy.")
    est.add_argument("--gpus", type=int, help="GPUs = workers; default: scaling.num_workers.")
    est.add_argument("--gpu-memory-gib", type=float, default=80.0,
                     help="Memory of one GPU (default: 80, an H100).")
    est.add_argument("--batch", type=int, help="Sequences per micro-batch and GPU; default: "
                     "train.batch_size_per_worker.")
    est.add_argument("--seq-len", type=int, help="Default: data.max_seq_len.")
    est.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    est.set_defaults(func=cmd_estimate)


def cmd_estimate(args, console: Console) -> int:
    import json

    from ray_app import api

    result = api.estimate(args.config, overrides=args.overrides, model=args.model,
                          method=args.method, strategy=args.strategy, gpus=args.gpus,
                          batch=args.batch, seq_len=args.seq_len,
                          gpu_memory_gib=args.gpu_memory_gib)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        result.render(console)
    return 0 if result.fits else 1


def main(argv: list[str] | None = None) -> int:
    console = Console()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, console)
    except UserError as err:
        # The message is plain text: `pip install 'ray-app[k8s]'` must not read as markup.
        console.print(f"[bold red]Error:[/bold red] {escape(redact(str(err)))}", highlight=False,
                      soft_wrap=True)  # one line: paths and commands stay copyable
        return 2
    except KeyboardInterrupt:
        console.print("Interrupted. Rerun the same command to resume from the last checkpoint.")
        return 130


if __name__ == "__main__":
    sys.exit(main())

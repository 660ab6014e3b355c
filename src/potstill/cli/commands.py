"""The commands that do work: ``distill`` a recipe, ``cache`` a teacher's signal, ``generate``
teacher answers, ``eval`` a saved model, rebuild a ``report``, ``convert`` a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .app import app, data_dir_override, fail, recipe_prefix, reported, setup, user_errors


@app.command()
def distill(
    recipe: Annotated[
        str, typer.Argument(help="recipe YAML file, or a built-in name (see `potstill recipes`)")
    ] = "default",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: key.sub=value (repeatable)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="run folder (default runs/<recipe name>)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue a run; finished parts are reused")] = False,
    overwrite: Annotated[bool, typer.Option(help="delete an existing run folder first")] = False,
    data_dir: Annotated[str | None, typer.Option(help="folder with the dataset's files")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    device: Annotated[
        str | None,
        typer.Option(help="where to compute: auto, cpu, cuda, cuda:N or mps (recipe: device)"),
    ] = None,
    teacher_device: Annotated[
        str | None, typer.Option(help="the teacher's device, if not the run's (teacher.device)")
    ] = None,
    report_to: Annotated[
        str | None,
        typer.Option(
            help="trackers, comma-separated: tensorboard, wandb, mlflow; or auto, all, "
            "none (train.report_to)"
        ),  # fmt: skip
    ] = None,
    teacher_server: Annotated[
        str | None,
        typer.Option(
            help="causal-lm: train from the teacher served by this vLLM / OpenAI-compatible "
            "server, e.g. http://gpu-host:8000 (teacher.server.url)"
        ),
    ] = None,
) -> None:
    """Run a recipe: teacher, baseline and distilled students, evaluation, report."""
    from ..recipe import load_recipe
    from ..report import console_text
    from ..runs import run
    from ..runs.folder import note_run_log

    speaks = setup(threads)
    overrides = list(set_ or [])
    with reported(interrupted="continue with the same command and --resume"):
        if data_dir:
            # text recipes (embed, causal-lm) call the dataset's folder data.folder
            overrides.append(data_dir_override(recipe, data_dir))
        if device or teacher_device:
            prefix = recipe_prefix(recipe)
            overrides += [f"{prefix}device={device}"] if device else []
            overrides += [f"{prefix}teacher.device={teacher_device}"] if teacher_device else []
        if teacher_server:
            overrides.append(f"{recipe_prefix(recipe)}teacher.server.url={teacher_server}")
        r = load_recipe(recipe, overrides)
        if report_to:
            from ..recipe import set_report_to

            value = report_to if report_to in ("auto", "all", "none") else report_to.split(",")
            r = set_report_to(r, value)
        run_dir = out or Path("runs") / r.name
        results = run(r, run_dir, resume=resume, overwrite=overwrite)
    if speaks:
        summary = console_text(run_dir, results)
        typer.echo(summary)
        note_run_log(run_dir, summary)


@app.command()
def cache(
    recipe: Annotated[
        str | None, typer.Argument(help="causal-lm recipe whose training data to cache")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a recipe field: key.sub=value")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="cache folder (recipe default: teacher.cache.path, else runs/<name>/teacher-cache)"
        ),
    ] = None,
    shard: Annotated[
        str, typer.Option(help="write only part i of N (i from 0), e.g. a Slurm array task")
    ] = "0/1",
    teacher: Annotated[
        str | None, typer.Option(help="without a recipe: teacher model (hub name or folder)")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="without a recipe: JSONL of {prompt, response}, {text}, or the "
            "answers potstill generate wrote"
        ),  # fmt: skip
    ] = None,
    k: Annotated[int, typer.Option(help="top-k tokens kept per position (no recipe)")] = 64,
    logprobs: Annotated[str, typer.Option(help="q8, float16 or float32")] = "q8",
    compression: Annotated[str, typer.Option(help="zlib or none")] = "zlib",
    max_length: Annotated[int, typer.Option(help="tokens per example (longer are cut)")] = 256,
    format_: Annotated[str, typer.Option("--format", help="chat or text")] = "chat",
    system: Annotated[str | None, typer.Option(help="system message (chat format)")] = None,
    batch_size: Annotated[int, typer.Option(help="teacher batch size")] = 8,
    shard_size: Annotated[int | None, typer.Option(help="examples per shard")] = None,
    tap: Annotated[
        list[str] | None,
        typer.Option(help="also store a module's output per token: name=module.path (no recipe)"),
    ] = None,
    teacher_server: Annotated[
        str | None,
        typer.Option(
            help="fill the cache from this vLLM server (teacher.server.url); only the "
            "tokenizer is loaded here"
        ),
    ] = None,  # fmt: skip
    served_name: Annotated[
        str | None, typer.Option(help="the name the server serves (default: the teacher's)")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="environment variable holding the server's API key")
    ] = None,
    status: Annotated[bool, typer.Option(help="only show how far the cache is filled")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
) -> None:
    """Run the teacher once over a dataset and write its top-k signal to a sharded cache.

    From a causal-lm recipe (its training data and teacher.cache settings: change them with
    --set teacher.cache.k=128), or from --teacher and --data with the options below.

    Several machines fill one cache with --shard 0/N … N-1/N (under torchrun, its processes
    split the part further); an interrupted run continues when rerun. Train from the cache
    with teacher.cache in the recipe.

    With --teacher-server a vLLM server computes the teacher (top --k per position without a
    recipe, teacher.cache.k with one) and only its tokenizer is loaded here.
    """
    from .. import distributed
    from ..cache import Encoding, cache_status, parse_part

    speaks = setup(threads)
    with reported(interrupted="rerun the same command to continue"):
        i, n = parse_part(shard)
        # under torchrun the processes split the part they were given
        rank, world = distributed.setup()
        part = (i * world + rank, n * world)
        if recipe is not None:
            from ..recipe import load_recipe
            from ..recipe.causal_lm import LMRecipe
            from ..runs.lm_data import cache_lm_recipe, cache_spec

            served = [f"teacher.server.{key}={value}" for key, value in (
                ("url", teacher_server), ("model", served_name), ("api_key_env", api_key_env))
                if value is not None]  # fmt: skip
            r = load_recipe(recipe, [*(set_ or []), *served])
            if not isinstance(r, LMRecipe):
                raise ValueError(
                    f"recipe {recipe!r} is not kind: causal-lm; classic recipes cache their "
                    "teacher's logits by themselves (teacher.cache: true)"
                )
            c = cache_spec(r)
            path = out or Path(c.path or Path("runs") / r.name / "teacher-cache")
            st = cache_status(path) if status else cache_lm_recipe(r, path, part=part)
        else:
            if out is None:
                raise ValueError("give --out (the cache folder) with --teacher and --data")
            if status:
                st = cache_status(out)
            else:
                if teacher is None or data is None:
                    raise ValueError("give a recipe, or --teacher and --data")
                server = None
                if teacher_server is not None:
                    from ..served import ServedTeacher

                    server = ServedTeacher(teacher_server, served_name or teacher, top_k=k,
                                           api_key_env=api_key_env)  # fmt: skip
                st = _cache_jsonl(
                    teacher, data, out, part=part, k=k, max_length=max_length, fmt=format_,
                    system=system, batch_size=batch_size, shard_size=shard_size,
                    encoding=Encoding(logprobs=logprobs, compression=compression),  # type: ignore[arg-type]
                    taps=_parse_taps(tap or []), server=server,
                )  # fmt: skip
        if world > 1 and not status:
            distributed.barrier()  # every process's part is written: show the whole cache
            st = cache_status(st.path)
    if not speaks:
        return
    per_token = st.bytes / max(1, st.positions)
    typer.echo(
        f"{st.path}: {len(st.done)} of {st.num_shards} shards written, {st.positions:,} tokens, "
        f"{st.bytes / 1e6:.1f} MB ({per_token:.0f} bytes per token)"
        + ("" if st.complete else f"; missing shards: {len(st.missing)}")
    )
    if st.parts:
        typer.echo("parts: " + ", ".join(f"{p} wrote {n}" for p, n in st.parts.items()))


def _parse_taps(items: list[str]) -> dict[str, str] | None:
    taps = {}
    for item in items:
        name, sep, module = item.partition("=")
        if not sep or not name or not module:
            raise ValueError(f"--tap must look like name=module.path, got {item!r}")
        taps[name] = module
    return taps or None


def _cache_jsonl(
    teacher: str, data: Path, out: Path, *, part: tuple[int, int], k: int, max_length: int,
    fmt: str, system: str | None, batch_size: int, shard_size: int | None, encoding: object,
    taps: dict[str, str] | None, server: Any = None,
) -> object:  # fmt: skip
    from ..assets import resolve
    from ..cache import write_cache
    from ..hf import load_model, load_tokenizer
    from ..llm.data import read_jsonl_examples, tokenize_examples
    from ..llm.forward import causal_lm_forward
    from ..runs.lm_data import config_vocab

    if fmt not in ("chat", "text"):
        raise ValueError(f"--format must be chat or text, got {fmt!r}")
    examples = read_jsonl_examples(data)
    path = resolve(teacher)
    tok = load_tokenizer(path)
    dataset = tokenize_examples(examples, tok, max_length, fmt=fmt, system=system)  # type: ignore[arg-type]
    options = {
        "tokenizer": tok, "shard_size": shard_size, "batch_size": batch_size, "part": part,
        "teacher_name": teacher, "taps": taps, "encoding": encoding,
    }  # fmt: skip
    if server is None:
        return write_cache(load_model(path, "causal-lm"), dataset, out, unit="token", k=k,
                           forward=causal_lm_forward, **options)  # fmt: skip
    try:
        server.check()
        return write_cache(server, dataset, out, unit="token", k=k,
                           vocab_size=config_vocab(teacher, tok), **options)  # fmt: skip
    finally:
        server.close()


@app.command()
def generate(
    prompts: Annotated[
        Path, typer.Option(help='JSONL: {"prompt": …} or {"messages": […]} per line')
    ],
    out: Annotated[Path, typer.Option(help="answers JSONL (appended; rerun to continue)")],
    teacher: Annotated[str, typer.Option(help="model that answers (hub name or folder)")],
    max_new_tokens: Annotated[int, typer.Option(help="answer length limit in tokens")] = 128,
    temperature: Annotated[float, typer.Option(help="sampling temperature; 0: greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 0.95,
    n: Annotated[int, typer.Option(help="answers per prompt")] = 1,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    format_: Annotated[str, typer.Option("--format", help="chat or text")] = "chat",
    system: Annotated[str | None, typer.Option(help="system message (chat format)")] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per batch")] = 8,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
) -> None:
    """Answer prompts with a teacher model, for response distillation.

    Batched, sampled or greedy, with the model's chat template; one JSON record per answer
    (prompt, answer, settings, teacher). An interrupted run continues when rerun.
    """
    from ..assets import resolve
    from ..data.prompts import read_prompts
    from ..hf import load_model, load_tokenizer
    from ..llm.answers import GenerationSettings, generate_answers

    setup(threads)
    with reported(interrupted="rerun the same command to continue"):
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed,
            format=format_, system=system, batch_size=batch_size,  # type: ignore[arg-type]
        )  # fmt: skip
        items = read_prompts(prompts)
        path = resolve(teacher)
        model, tok = load_model(path, "causal-lm"), load_tokenizer(path)
        st = generate_answers(model, tok, items, out, settings, teacher_name=teacher)
    typer.echo(
        f"{out}: {st.answers} answers to {st.prompts} prompts ({st.skipped} answered before), "
        f"{st.new_tokens} new tokens at {st.tokens_per_s:.1f} tokens/s"
    )


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Argument(help="a model folder potstill wrote (any kind)")],
    data: Annotated[
        str | None,
        typer.Option(
            help="image classifiers: a built-in dataset (default fashion-mnist); "
            "others: a table of your data (file, folder, glob, or hub:NAME)"
        ),  # fmt: skip
    ] = None,
    teacher: Annotated[Path | None, typer.Option(help="teacher folder, for agreement")] = None,
    split: Annotated[
        str | None, typer.Option(help="the table's split (default: test, else the only one)")
    ] = None,
    columns: Annotated[
        str | None, typer.Option(help="field=column pairs, comma-separated: text=review,label=y")
    ] = None,
    max_length: Annotated[int, typer.Option(help="tokens per example")] = 128,
    data_dir: Annotated[str | None, typer.Option(help="folder with the dataset's files")] = None,
    seed: Annotated[int, typer.Option(help="the run's seed (it fixes the validation split)")] = 0,
    val_size: Annotated[int, typer.Option(help="the run's data.val_size")] = 5000,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
) -> None:
    """Evaluate a saved model on data; prints JSON.

    Image classifiers (potstill's or Hugging Face's) on a built-in dataset's test split; text
    classifiers on your table (accuracy, macro-F1); causal LMs on a corpus or conversations
    (perplexity); sentence encoders against --teacher (neighbour agreement). --teacher adds the
    figures that compare with it.
    """
    from ..exports import evaluate_export

    setup(threads)
    with reported(interrupted="nothing was written"):
        cols = dict(pair.split("=", 1) for pair in columns.split(",")) if columns else None
        row = evaluate_export(
            model, data=data, teacher=teacher, split=split, columns=cols,
            max_length=max_length, data_dir=data_dir, seed=seed, val_size=val_size,
        )  # fmt: skip
    typer.echo(json.dumps(row, indent=1))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run folder")]) -> None:
    """Rebuild report.md and report.html of a finished run (any recipe kind)."""
    from ..report import write_report

    try:
        md, page = write_report(run_dir)
    except user_errors() as e:
        fail(e)
        return
    typer.echo(f"report: {md}  and  {page}")


@app.command()
def convert(
    gguf_file: Annotated[Path, typer.Argument(help="a .gguf model file transformers can read")],
    out_dir: Annotated[Path, typer.Argument(help="folder for the safetensors model")],
) -> None:
    """Convert a GGUF model into a plain safetensors folder once, for fast loads later."""
    import time

    from ..hf import convert_gguf

    t = time.perf_counter()
    try:
        out = convert_gguf(gguf_file, out_dir)
    except user_errors() as e:
        fail(e)
        return
    typer.echo(f"wrote {out} in {time.perf_counter() - t:.0f} s; load it with from_pretrained")

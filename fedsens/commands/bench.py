"""`fedsens bench`: the round loop against the bare compute it does, and beside a PFLlib-style loop."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsens.commands._common import clean_errors


@clean_errors
def bench(
    clients: list[int] = typer.Option([20, 1000, 10000], "--clients", help="client counts (repeat the option)"),
    local: list[str] = typer.Option(
        ["head", "attn,head"], "--local", help="parts kept local, one configuration each (repeat the option)"
    ),
    join_ratio: float = typer.Option(0.01, help="fraction of clients sampled each round"),
    rounds: int = typer.Option(2, help="rounds measured per configuration"),
    model: str = typer.Option("vit-micro", help="model preset"),
    per_client: int = typer.Option(8, help="synthetic samples per client (a quarter of them are test samples)"),
    client_store: str = typer.Option("memory", help="memory or disk"),
    preset: str | None = typer.Option(
        None,
        help="measure a preset's own run instead of a synthetic population, e.g. embedded (digits, vit-micro, "
        "20 clients: a quick sweep cell's round); --clients, --join-ratio, --per-client and --model are then the "
        "preset's",
    ),
    reference_up_to: int = typer.Option(
        1000, help="also run the PFLlib-style reference loop (a model copy per client) up to this many clients"
    ),
    out: Path = typer.Option(Path("runs/bench"), help="folder for bench.csv"),
    quiet: bool = typer.Option(False, "--quiet", help="no per-configuration lines"),
    throughput: bool = typer.Option(
        False,
        "--throughput",
        help="instead: images/s of one client's local training through the engine against a plain timm training "
        "step at the same batch (bf16 on CUDA), e.g. --model vit_small_patch16_224 --device cuda; "
        "writes OUT/throughput.csv",
    ),
    batch_size: int = typer.Option(64, help="with --throughput: the batch"),
    steps: int = typer.Option(20, help="with --throughput: training steps timed"),
    device: str = typer.Option("auto", help="with --throughput: auto, cpu, cuda or cuda:N"),
) -> None:
    """Write OUT/bench.csv: seconds per round, training / evaluation vs bare compute, peak RSS, local bytes,
    and the arithmetic limit: model FLOPs per sample (counted), FLOPs of a round, the measured matmul peak at
    this thread count, achieved / peak."""
    from fedsens.personalize.benchmark import BenchCase, run_bench
    from fedsens.personalize.errors import UserError

    if throughput:
        _throughput(model, batch_size, steps, device, local, out)
        return
    if client_store not in ("memory", "disk"):
        raise UserError(f"--client-store must be memory or disk (got {client_store!r})")
    if preset is not None:
        from fedsens.personalize import presets

        config = presets.get(preset).run_config()
        clients, join_ratio, model = [config.clients], config.join_ratio, config.model
    cases = []
    for count in clients:
        for spec in local:
            common = dict(
                clients=count,
                personalize=spec,
                join_ratio=join_ratio,
                rounds=rounds,
                model=model,
                per_client=per_client,
                preset=preset,
            )
            cases.append(BenchCase(**common, client_store=client_store))  # type: ignore[arg-type]
            if count <= reference_up_to:
                cases.append(BenchCase(**common, loop="pfllib"))  # type: ignore[arg-type]
    frame = run_bench(cases, out, quiet=quiet)
    typer.echo(f"bench: {len(frame)} configurations in {out / 'bench.csv'}")


def _throughput(model: str, batch_size: int, steps: int, device: str, local: list[str], out: Path) -> None:
    from fedsens.personalize import runio
    from fedsens.personalize.benchmark import THROUGHPUT_COLUMNS, measure_throughput
    from fedsens.personalize.errors import UserError

    if batch_size < 1 or steps < 1:
        raise UserError(f"--batch-size and --steps must be at least 1 (got {batch_size}, {steps})")
    rows = []
    for spec in dict.fromkeys(["none", *local]):
        rows.append(measure_throughput(model, batch_size, steps, device, out / "runs" / spec.replace(",", "+"), spec))
        row = rows[-1]
        typer.echo(
            f"{model} batch {batch_size}, {spec} local: fedsens {row['fedsens_images_s']:.1f} images/s, plain timm "
            f"step {row['plain_images_s']:.1f} images/s ({row['ratio']:.2f}x) on {row['device']}; "
            f"{row['train_gflop_per_image']:.3g} GFLOP an image, model FLOPs utilisation {row['fedsens_mfu']:.2f} "
            f"(plain {row['plain_mfu']:.2f}) of a measured {row['peak_tflop_s']:.3g} TFLOP/s peak"
        )
    out.mkdir(parents=True, exist_ok=True)
    runio.write_table(out / "throughput.csv", rows, THROUGHPUT_COLUMNS)
    typer.echo(f"bench: {out / 'throughput.csv'}")

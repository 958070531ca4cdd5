"""`fedsens models [NAME]`: the supported model families, or one model's part manifest without training."""

from __future__ import annotations

import typer

from fedsens.commands._common import clean_errors


@clean_errors
def models(
    name: str | None = typer.Argument(None, help="a preset or timm model name: print its part manifest"),
    model_arg: list[str] | None = typer.Option(
        None, "--model-arg", metavar="KEY=VALUE", help="a timm constructor option (repeatable), e.g. depth=4"
    ),
    classes: int = typer.Option(10, min=1, help="classes of the head the manifest counts"),
) -> None:
    """List the model families (with example names), or print NAME's parameters and bytes per part and block."""
    from fedsens.personalize import catalog, model_args

    if name is None:
        if model_arg:
            raise typer.BadParameter("--model-arg needs a model NAME")
        typer.echo(catalog.families_text())
        return
    typer.echo(catalog.manifest_text(name, model_args.parse(model_arg), classes))

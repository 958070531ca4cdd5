"""`fedsens flower app DIR`: a Flower app project for one fedsens configuration, for `flwr run DIR`.

The project holds a pyproject.toml (the app's components and the run config, one key per RunConfig
field) and a two-line module naming the ServerApp and ClientApp. Both come from the installed fedsens,
so every SuperNode needs `pip install "fedsens[flower]"`; the app carries only the configuration.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedsens.personalize import runio
from fedsens.personalize.config import RunConfig
from fedsens.personalize.errors import UserError

APP_MODULE = "fedsens_app"

_MODULE_TEXT = '''"""A fedsens run as a Flower app, written by `fedsens flower app` (the run config: pyproject.toml)."""

from fedsens.personalize.flower.client import build_client_app
from fedsens.personalize.flower.server import build_server_app

server_app = build_server_app()
client_app = build_client_app()
'''


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _absolute(config: RunConfig) -> RunConfig:
    """Paths as the ServerApp and ClientApp processes (started elsewhere) will need them."""
    changes: dict[str, str] = {"out": str(Path(config.out).resolve())}
    if config.data_root:
        changes["data_root"] = str(Path(config.data_root).resolve())
    if config.scheme.endswith(".json"):
        changes["scheme"] = str(Path(config.scheme).resolve())
    return config.replace(**changes)


def pyproject_text(config: RunConfig, *, reply_timeout: float = 600.0) -> str:
    from fedsens.personalize.flower import records  # imports flwr: only when an app is written

    run_config = records.run_config_of(_absolute(config), **{"reply-timeout": reply_timeout})
    lines = [
        "# A fedsens run as a Flower app: `flwr run . SUPERLINK` (see fedsens's docs/flower.md,",
        '# "A real federation"). Override any value: flwr run . SUPERLINK -c "rounds=5"',
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "fedsens-{config.method}"',
        'version = "1.0.0"',
        f'description = "fedsens {config.method} on {config.dataset} with {config.clients} clients"',
        'dependencies = ["fedsens[flower]"]',
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        'publisher = "fedsens"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{APP_MODULE}:server_app"',
        f'clientapp = "{APP_MODULE}:client_app"',
        "",
        "[tool.flwr.app.config]",
        *(f'"{key}" = {_toml_value(value)}' for key, value in run_config.items()),
    ]
    return "\n".join(lines) + "\n"


def write_app(directory: Path, config: RunConfig, *, overwrite: bool = False) -> Path:
    """Write the Flower app project into `directory`; returns its pyproject.toml."""
    from fedsens.personalize.flower.engine import check_protocol

    check_protocol(config)
    directory = Path(directory)
    target = directory / "pyproject.toml"
    files = {target: pyproject_text(config), directory / f"{APP_MODULE}.py": _MODULE_TEXT}
    present = [path for path in files if path.exists()]
    if present and not overwrite:  # every file it writes, checked before any is written
        raise UserError(f"{present[0]} exists; pass --overwrite to replace it or choose another DIR")
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        runio.write_text(path, text)
    return target

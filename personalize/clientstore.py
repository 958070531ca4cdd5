"""Every client's own tensors, stored once per tensor name for all clients (clients x shape).

A run with 10,000 clients and a local head holds one 10,000 x 10 x 192 tensor, not 10,000 dicts of
small tensors. `client(c)` gives views into the rows of client c; `put(c, values)` writes them back.

The memory store keeps the tensors in RAM and is checkpointed whole. The disk store memory-maps one
file per tensor name (populations whose state exceeds RAM): writes go to a pending set of rows that
the checkpoint records first and only then applies to the files, so a run killed at any moment
resumes exactly (`replay` applies the checkpoint's pending rows again).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

Rows = dict[str, torch.Tensor]


def _file_name(name: str) -> str:
    return name.replace("/", "_") + ".bin"


class ClientStore:
    """Named tensors of shape (clients, *shape); rows are clients."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], clients: int, folder: Path | None = None):
        self.tensors = dict(tensors)
        self.clients = clients
        self.folder = folder  # None: in memory
        self.pending: dict[int, Rows] = {}  # disk store: rows written since the last checkpoint

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        clients: int,
        first: Mapping[str, torch.Tensor],
        fill: Callable[[int], Mapping[str, torch.Tensor]] | None = None,
        folder: Path | None = None,
    ) -> ClientStore:
        """A store whose every row starts as `first`, or as `fill(c)` for client c when given."""
        tensors = {}
        for name, value in first.items():
            shape = (clients, *value.shape)
            if folder is None:
                tensors[name] = torch.empty(shape, dtype=value.dtype, device=value.device)
            else:
                tensors[name] = _mapped(folder / _file_name(name), shape, value.dtype, create=True)
            tensors[name].copy_(value.detach().to(tensors[name].device).expand(shape))
        store = cls(tensors, clients, folder)
        if fill is not None:
            for c in range(clients):
                store._write(c, fill(c))
        return store

    @classmethod
    def open(cls, clients: int, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], folder: Path) -> ClientStore:
        """The disk store of an earlier run (resume)."""
        tensors = {
            name: _mapped(folder / _file_name(name), (clients, *shape), dtype, create=False)
            for name, (shape, dtype) in layout.items()
        }
        return cls(tensors, clients, folder)

    # --- rows ---------------------------------------------------------------------------------

    def client(self, c: int) -> Rows:
        """Client c's tensors (views into the store, or its pending rows)."""
        if c in self.pending:
            return dict(self.pending[c])
        return {name: t[c] for name, t in self.tensors.items()}

    def put(self, c: int, values: Mapping[str, torch.Tensor]) -> None:
        if self.folder is None:
            self._write(c, values)
        else:
            row = self.pending.setdefault(c, {})
            for name in self.tensors:
                row[name] = values[name].detach().to("cpu", copy=True)

    def rows(self, clients: Sequence[int]) -> Rows:
        """The tensors of several clients stacked along the first dimension (for batched evaluation)."""
        index = torch.as_tensor(list(clients), dtype=torch.long)
        stacked = {name: t.index_select(0, index.to(t.device)) for name, t in self.tensors.items()}
        for position, c in enumerate(clients):
            if c in self.pending:
                for name, value in self.pending[c].items():
                    stacked[name][position] = value
        return stacked

    @torch.no_grad()
    def _write(self, c: int, values: Mapping[str, torch.Tensor]) -> None:
        for name, t in self.tensors.items():
            t[c].copy_(values[name])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: (tuple(t.shape[1:]), t.dtype) for name, t in self.tensors.items()}

    # --- checkpoints --------------------------------------------------------------------------

    def checkpoint(self) -> dict:
        """What a checkpoint holds: the whole store (memory) or the rows written since the last one (disk)."""
        if self.folder is None:
            return {"tensors": self.tensors}
        clients = sorted(self.pending)
        rows = {name: torch.stack([self.pending[c][name] for c in clients]) for name in self.tensors} if clients else {}
        return {"clients": clients, "rows": rows}

    def commit(self) -> None:
        """After the checkpoint is on disk: apply the pending rows to the mapped files."""
        for c, values in self.pending.items():
            self._write(c, values)
        self.pending.clear()

    def replay(self, saved: Mapping) -> None:
        """Resume: bring the store to the checkpoint's state."""
        if self.folder is None:
            for name, value in saved["tensors"].items():
                self.tensors[name].copy_(value)
            return
        for position, c in enumerate(saved["clients"]):
            self._write(c, {name: rows[position] for name, rows in saved["rows"].items()})


def _mapped(path: Path, shape: tuple[int, ...], dtype: torch.dtype, *, create: bool) -> torch.Tensor:
    """A tensor backed by a file (shared mapping: writes land in the file)."""
    numel = math.prod(shape)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.truncate(numel * torch.empty((), dtype=dtype).element_size())
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

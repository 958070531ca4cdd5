"""Every client's own tensors, stored once per tensor name for all clients (clients x shape).

A run with 10,000 clients and a local head holds one 10,000 x 10 x 192 tensor, not 10,000 dicts of
small tensors. `client(c)` gives client c's rows; `put(c, values)` writes them back; `rows(clients)`
gives several clients' rows stacked (batched evaluation).

The memory store keeps the tensors in RAM and is checkpointed whole. The disk store keeps one raw
row-major file per tensor name (`np.memmap(path, dtype, "r", shape=(clients, *shape))` opens one for
inspection) for populations whose state exceeds RAM. It reads and writes rows with positioned I/O
rather than through a memory mapping: every page of a mapping a process has touched counts in its
resident memory, so evaluating 50,000 clients through a mapping would show 30 GB of RSS, while
`pread` leaves the pages in the kernel's cache, which it frees as it needs to. Writes go to a pending
set of rows that the checkpoint records first and only then applies to the files, so a run killed at
any moment resumes exactly (`replay` applies the checkpoint's pending rows again).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from fedsens.personalize.errors import CorruptFileError

Rows = dict[str, torch.Tensor]
BUILD_BLOCK_BYTES = 64 * 2**20  # the disk store is filled this many bytes of rows at a time


def _file_name(name: str) -> str:
    return name.replace("/", "_") + ".bin"


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as flat bytes (shared, not copied)."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def _runs(sorted_unique: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive stretches of sorted, distinct clients as (first, count)."""
    runs: list[tuple[int, int]] = []
    for c in sorted_unique:
        if runs and runs[-1][0] + runs[-1][1] == c:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((c, 1))
    return runs


class MemoryRows:
    """One tensor name's rows for all clients, in RAM."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape, self.dtype = tuple(tensor.shape[1:]), tensor.dtype

    def row(self, c: int) -> torch.Tensor:
        return self.tensor[c]  # a view: an in-place change by the caller lands in the store

    def take(self, clients: Sequence[int]) -> torch.Tensor:
        if len(clients) and list(clients) == list(range(clients[0], clients[0] + len(clients))):
            return self.tensor[clients[0] : clients[0] + len(clients)]  # a view: consecutive clients copy nothing
        return self.tensor.index_select(0, torch.as_tensor(list(clients), dtype=torch.long, device=self.tensor.device))

    @torch.no_grad()
    def write(self, c: int, value: torch.Tensor) -> None:
        self.tensor[c].copy_(value)

    def close(self) -> None:
        pass


class FileRows:
    """One tensor name's rows for all clients in one file, read and written with pread/pwrite."""

    def __init__(self, path: Path, clients: int, shape: tuple[int, ...], dtype: torch.dtype, *, create: bool):
        self.path, self.clients, self.shape, self.dtype = Path(path), clients, tuple(shape), dtype
        self.row_bytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()
        size = clients * self.row_bytes
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self.fd, size)
        else:
            if not self.path.exists() or self.path.stat().st_size != size:
                found = self.path.stat().st_size if self.path.exists() else "no file"
                raise CorruptFileError(
                    self.path, f"expected {size} bytes of client rows, found {found}", "start over with --overwrite"
                )
            self.fd = os.open(self.path, os.O_RDWR)

    def _read_into(self, out: torch.Tensor, first: int) -> None:
        buffer, offset, done = _bytes_of(out), first * self.row_bytes, 0
        while done < len(buffer):  # a large read may come back in parts
            got = os.preadv(self.fd, [buffer[done:]], offset + done)
            if got <= 0:
                raise CorruptFileError(self.path, "ended early", "start over with --overwrite")
            done += got

    def _write_from(self, rows: torch.Tensor, first: int) -> None:
        buffer, offset, done = _bytes_of(rows.detach().to("cpu").contiguous()), first * self.row_bytes, 0
        while done < len(buffer):
            done += os.pwrite(self.fd, buffer[done:], offset + done)

    def row(self, c: int) -> torch.Tensor:
        return self.take([c])[0]

    def take(self, clients: Sequence[int]) -> torch.Tensor:
        """Fresh tensors (clients, *shape): one read per stretch of consecutive clients."""
        wanted = sorted(set(clients))
        out = torch.empty((len(wanted), *self.shape), dtype=self.dtype)
        position = 0
        for first, count in _runs(wanted):
            self._read_into(out[position : position + count], first)
            position += count
        if wanted == list(clients):
            return out
        where = {c: k for k, c in enumerate(wanted)}
        return out.index_select(0, torch.as_tensor([where[c] for c in clients], dtype=torch.long))

    def write(self, c: int, value: torch.Tensor) -> None:
        self._write_from(value.reshape(1, *self.shape), c)

    def fill(self, value: torch.Tensor) -> None:
        """Every row set to `value`, a block of rows per write."""
        per_block = max(1, min(self.clients, BUILD_BLOCK_BYTES // max(1, self.row_bytes)))
        block = value.detach().to("cpu").reshape(1, *self.shape).expand(per_block, *self.shape).contiguous()
        for first in range(0, self.clients, per_block):
            self._write_from(block[: min(per_block, self.clients - first)], first)

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


class ClientStore:
    """Named tensors of shape (clients, *shape); rows are clients."""

    def __init__(self, columns: Mapping[str, MemoryRows | FileRows], clients: int, folder: Path | None = None):
        self.columns = dict(columns)
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
        columns: dict[str, MemoryRows | FileRows] = {}
        for name, value in first.items():
            value = value.detach()
            if folder is None:
                tensor = torch.empty((clients, *value.shape), dtype=value.dtype, device=value.device)
                tensor.copy_(value.expand(tensor.shape))
                columns[name] = MemoryRows(tensor)
            else:
                rows = FileRows(folder / _file_name(name), clients, tuple(value.shape), value.dtype, create=True)
                rows.fill(value)
                columns[name] = rows
        store = cls(columns, clients, folder)
        if fill is not None:
            for c in range(clients):
                store._write(c, fill(c))
        return store

    @classmethod
    def open(cls, clients: int, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], folder: Path) -> ClientStore:
        """The disk store of an earlier run (resume)."""
        columns: dict[str, MemoryRows | FileRows] = {
            name: FileRows(folder / _file_name(name), clients, shape, dtype, create=False)
            for name, (shape, dtype) in layout.items()
        }
        return cls(columns, clients, folder)

    def close(self) -> None:
        for column in self.columns.values():
            column.close()

    # --- rows ---------------------------------------------------------------------------------

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The memory store's tensors (clients x shape per name)."""
        if self.folder is not None:
            raise TypeError("the disk store holds no tensors in memory; use rows() or client()")
        return {name: column.tensor for name, column in self.columns.items()}  # type: ignore[union-attr]

    def client(self, c: int) -> Rows:
        """Client c's tensors (views into the memory store; fresh tensors from the disk store or its pending rows)."""
        if c in self.pending:
            return dict(self.pending[c])
        return {name: column.row(c) for name, column in self.columns.items()}

    def put(self, c: int, values: Mapping[str, torch.Tensor]) -> None:
        if self.folder is None:
            self._write(c, values)
        else:
            row = self.pending.setdefault(c, {})
            for name in self.columns:
                row[name] = values[name].detach().to("cpu", copy=True)

    def rows(self, clients: Sequence[int]) -> Rows:
        """The tensors of several clients stacked along the first dimension (for batched evaluation).
        From the memory store, consecutive clients come as a view of the store: read them, do not write."""
        stacked = {name: column.take(clients) for name, column in self.columns.items()}
        waiting = [(position, c) for position, c in enumerate(clients) if c in self.pending]
        for position, c in waiting:  # only the disk store has pending rows, and its rows are fresh tensors
            for name, value in self.pending[c].items():
                stacked[name][position] = value
        return stacked

    def _write(self, c: int, values: Mapping[str, torch.Tensor]) -> None:
        for name, column in self.columns.items():
            column.write(c, values[name])

    @property
    def row_bytes(self) -> int:
        """The bytes of one client's tensors."""
        return sum(math.prod(c.shape) * torch.empty((), dtype=c.dtype).element_size() for c in self.columns.values())

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.clients

    @property
    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: (column.shape, column.dtype) for name, column in self.columns.items()}

    # --- checkpoints --------------------------------------------------------------------------

    def checkpoint(self) -> dict:
        """What a checkpoint holds: the whole store (memory) or the rows written since the last one (disk)."""
        if self.folder is None:
            return {"tensors": self.tensors}
        clients = sorted(self.pending)
        rows = {name: torch.stack([self.pending[c][name] for c in clients]) for name in self.columns} if clients else {}
        return {"clients": clients, "rows": rows}

    def commit(self) -> None:
        """After the checkpoint is on disk: apply the pending rows to the files."""
        for c, values in self.pending.items():
            self._write(c, values)
        self.pending.clear()

    def replay(self, saved: Mapping) -> None:
        """Resume: bring the store to the checkpoint's state."""
        if self.folder is None:
            for name, value in saved["tensors"].items():
                self.columns[name].tensor.copy_(value)  # type: ignore[union-attr]
            return
        for position, c in enumerate(saved["clients"]):
            self._write(c, {name: rows[position] for name, rows in saved["rows"].items()})

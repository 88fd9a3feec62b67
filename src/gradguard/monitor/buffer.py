"""The monitor's on-device buffer: one row per observed step, read back in one block.

Writing a row is one ``torch.cat(..., out=row)`` into a preallocated fp32 buffer (one
kernel on an accelerator) and reads nothing back: the row counter and the step numbers are
Python ints, because the host knows how many steps it observed. :meth:`RingBuffer.read`
moves every row written since the last read to the host in **one** transfer: the
monitor's only synchronisation with the device.

A buffer may also hold a few *auxiliary* rows (``aux_rows``), written at most once per
read with :meth:`RingBuffer.write_aux` (the monitor's Adam signals, computed at the step
that completes an interval). They sit in front of the step rows, so that
:meth:`RingBuffer.read_with_aux` moves both in the same single transfer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["RingBuffer"]

# Above this many rows, row views are made on the fly instead of cached (a cached view is
# a Python object of a few hundred bytes; 4096 rows is well under 2 MB).
_MAX_CACHED_ROWS = 4096


class RingBuffer:
    """A ``(rows, width)`` fp32 buffer on the device, filled row by row and read (and
    emptied) in one block.

    Args:
        width: values per row.
        rows: rows the buffer holds (the monitor reads it back when it holds
            ``log_every`` rows).
        device: where the buffer lives; ``None``: allocated on the device of the first
            row written.
        aux_rows: auxiliary rows in front of the step rows (see :meth:`write_aux`).

    Example:
        >>> buf = RingBuffer(3, rows=2)
        >>> buf.write(7, torch.tensor([1.0, 2.0]), torch.tensor([3.0]))
        1
        >>> values, steps = buf.read()
        >>> values.tolist(), steps
        ([[1.0, 2.0, 3.0]], [7])
    """

    def __init__(self, width: int, rows: int, device: torch.device | str | None = None,
                 aux_rows: int = 0) -> None:
        self.width = width
        self.rows = rows
        self.aux_rows = aux_rows
        self._aux_written = False  # a host flag: were the auxiliary rows written since the read
        #: Where the buffer lives (``None`` until the first write when not given).
        self.device: torch.device | None = None if device is None else torch.device(device)
        self._buf: Tensor | None = None
        self._views: tuple[Tensor, ...] | None = None
        self._capacity = 0  # rows allocated (a host int: no shape lookup per write)
        self._row = 0  # rows written since the last read (a host int: never read back)
        self._steps: list[int] = []  # their step numbers
        if self.device is not None:
            self._allocate(self.device, rows)

    def _allocate(self, device: torch.device, rows: int) -> None:
        # NaN-filled so that a row that was never written cannot pass for real data.
        self._buf = torch.full((self.aux_rows + rows, self.width), math.nan,
                               dtype=torch.float32, device=device)
        # Views of each row, made once: building a view costs more than the copy itself.
        # (unbind/select, not Python indexing: the latter is unsupported in FakeTensorMode.)
        self._views = self._data().unbind(0) if rows <= _MAX_CACHED_ROWS else None
        self._capacity = rows
        self.device = device

    def _data(self) -> Tensor:
        """The step rows (after the auxiliary ones)."""
        assert self._buf is not None
        return self._buf.narrow(0, self.aux_rows, self._buf.shape[0] - self.aux_rows)

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(rows, width)`` of the allocated step rows, ``None`` before allocation."""
        return None if self._buf is None else (self._capacity, self.width)

    def set_aux_rows(self, aux_rows: int) -> None:
        """Hold ``aux_rows`` auxiliary rows from now on (pending step rows are kept; an
        allocated buffer is reallocated on its device, without any host read).

        Raises:
            ValueError: if ``aux_rows`` is negative.
        """
        if aux_rows < 0:
            raise ValueError(f"aux_rows must be >= 0, got {aux_rows!r}")
        if aux_rows == self.aux_rows:
            return
        if self._buf is None:
            self.aux_rows = aux_rows
            return
        pending, steps = self.pending_rows(), self.steps
        self.aux_rows = aux_rows
        self._allocate(self._buf.device, self._capacity)
        self._aux_written = False
        self.load(pending, steps)

    def write_aux(self, fields: Tensor, per_tensor: Tensor) -> None:
        """Write ``cat((fields, per_tensor), dim=1)`` into the auxiliary rows (one kernel, no
        host read); :meth:`read_with_aux` returns them with the next read.

        Args:
            fields: ``(aux_rows, k)`` values.
            per_tensor: ``(aux_rows, width - k)`` values, on the buffer's device.

        Raises:
            RuntimeError: without auxiliary rows or before the buffer is allocated.
        """
        if self._buf is None or self.aux_rows == 0:
            raise RuntimeError("write_aux() needs an allocated buffer with aux_rows > 0")
        torch.cat((fields.detach(), per_tensor.detach()), dim=1,
                  out=self._buf.narrow(0, 0, self.aux_rows))
        self._aux_written = True

    @property
    def pending(self) -> int:
        """Rows written since the last :meth:`read`."""
        return self._row

    @property
    def steps(self) -> list[int]:
        """The step numbers of the pending rows (a copy)."""
        return list(self._steps)

    def write(self, step: int, fields: Tensor, per_tensor: Tensor) -> int:
        """Write ``cat(fields, per_tensor)`` as the next row, without any host read.

        Args:
            step: the row's step number (a Python int).
            fields: the first values of the row (cast to fp32 by the copy).
            per_tensor: the rest of the row; ``fields.numel() + per_tensor.numel()`` must
                be ``width``, on the buffer's device.

        Returns:
            The number of pending rows, this one included.

        Raises:
            RuntimeError: if the buffer is full (read it first).
        """
        if fields.requires_grad or per_tensor.requires_grad:  # backward(create_graph=True)
            fields, per_tensor = fields.detach(), per_tensor.detach()  # cat(out=) refuses them
        if self._buf is None:
            self._allocate(fields.device, self.rows)
        assert self._buf is not None
        r = self._row
        if r >= self._capacity:
            raise RuntimeError(f"RingBuffer is full ({r} rows): read() it before writing")
        row = self._views[r] if self._views is not None else self._buf.select(
            0, self.aux_rows + r)
        torch.cat((fields, per_tensor), out=row)  # one kernel; casts to fp32 if needed
        self._steps.append(step)
        self._row = r + 1
        return self._row

    def read(self) -> tuple[Tensor, list[int]] | None:
        """Move the pending rows to the host (the one synchronisation) and empty the buffer.

        Returns:
            ``(values, steps)``: a float64 CPU tensor ``(pending, width)`` and the rows'
            step numbers; ``None`` when no row is pending.
        """
        out = self.read_with_aux()
        return None if out is None else (out[0], out[1])

    def read_with_aux(self) -> tuple[Tensor, list[int], Tensor | None] | None:
        """:meth:`read`, with the auxiliary rows written since the last read in the same
        transfer.

        Returns:
            ``(values, steps, aux)``: as :meth:`read`, and the ``(aux_rows, width)``
            float64 auxiliary rows, or ``None`` when they were not written; ``None`` when
            no row is pending.
        """
        n = self._row
        aux = self.aux_rows if self._aux_written else 0
        self._aux_written = False
        if n == 0 or self._buf is None:
            return None
        # A single contiguous block (auxiliary rows first); float64 on the host.
        start = self.aux_rows - aux
        block = self._buf.narrow(0, start, aux + n).to("cpu").double()
        steps = self._steps
        self._row = 0
        self._steps = []
        return block.narrow(0, aux, n), steps, block.narrow(0, 0, aux) if aux else None

    def pending_rows(self) -> Tensor:
        """A clone of the pending rows on the buffer's device (no synchronisation)."""
        if self._buf is None:
            return torch.empty(0, self.width)
        return self._data().narrow(0, 0, self._row).clone()

    def load(self, values: Tensor, steps: list[int]) -> None:
        """Replace the pending rows by ``values`` (from :meth:`pending_rows`), growing the
        buffer if they do not fit.

        Args:
            values: ``(len(steps), width)`` rows, on any device.
            steps: their step numbers.

        Raises:
            ValueError: if ``values`` does not have that shape.
        """
        n = len(steps)
        if values.shape != (n, self.width):
            raise ValueError(
                f"pending rows have shape {tuple(values.shape)}, expected ({n}, {self.width})"
            )
        need = max(n, self.rows)
        if self._buf is None or self._capacity < need:
            device = self.device if self.device is not None else values.device
            self._allocate(device, need)
        assert self._buf is not None
        if n:
            # _foreach_copy_ rather than copy_: it also works under FakeTensorMode.
            torch._foreach_copy_([self._data().narrow(0, 0, n)], [values.to(self._buf.device)])
        self._row = n
        self._steps = list(steps)

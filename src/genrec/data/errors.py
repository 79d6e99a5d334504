"""The one exception the data layer raises for bad input: it always names the file (and line when known)."""

from __future__ import annotations

from genrec.errors import UserError


class DataError(UserError):
    """Bad or missing input data. The message names the file, and the line where one is to blame."""

    def __init__(self, source: str, message: str, line: int | None = None):
        self.source = source
        self.line = line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")

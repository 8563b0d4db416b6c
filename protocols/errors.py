"""Protocol-level exceptions of the dsi wire protocols.

They deliberately do not derive from ``node.errors`` (``protocols`` sits below ``node``);
the node maps them onto its ``DatasetsError`` hierarchy at its boundary.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class: a peer sent something we cannot accept, or answered with an error."""


class FrameError(ProtocolError):
    """A length-prefixed frame is malformed (bad varint, truncated body)."""


class FrameTooLargeError(FrameError):
    """A frame's length prefix is over the cap; the body is never read."""

    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        super().__init__(
            f"frame of {length} bytes exceeds the {limit}-byte cap; send large data by CID"
        )


class MalformedMessageError(ProtocolError):
    """A frame does not decode to the expected protobuf message, or a field is invalid."""


class ErrorResponse(ProtocolError):
    """A ``dsi.v1.Error``: raised by an authority to answer with it, and by the client on
    receiving one. ``code`` is a ``dsi.v1.ErrorCode`` value."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)

    @property
    def code_name(self) -> str:
        from protocols.pb import task_pb2

        try:
            return task_pb2.ErrorCode.Name(self.code)
        except ValueError:
            return f"ERROR_CODE_{self.code}"

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}"

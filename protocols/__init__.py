"""dsi wire protocols: framing, codecs, protocol ids, the gossip announce codec and the
``/dsi/task/1.0.0`` client and server. Generated protobuf code lives in ``protocols.pb``.

Nothing here imports from ``node``: the node implements ``TaskAuthority`` and plugs it in.
Importing this package does not import libp2p (only ``protocols.task`` at use and the
announcement validator need it).
"""

from protocols.announce import (
    MAX_ANNOUNCEMENT_SIZE,
    TOPIC,
    decode_announcement,
    encode_offer,
    encode_update,
    make_topic_validator,
)
from protocols.errors import (
    ErrorResponse,
    FrameError,
    FrameTooLargeError,
    MalformedMessageError,
    ProtocolError,
)
from protocols.framing import MAX_FRAME_SIZE, encode_frame, read_frame, write_frame
from protocols.pb import task_pb2 as pb

__all__ = [
    "MAX_ANNOUNCEMENT_SIZE",
    "MAX_FRAME_SIZE",
    "TOPIC",
    "ErrorResponse",
    "FrameError",
    "FrameTooLargeError",
    "MalformedMessageError",
    "ProtocolError",
    "decode_announcement",
    "encode_frame",
    "encode_offer",
    "encode_update",
    "make_topic_validator",
    "pb",
    "read_frame",
    "write_frame",
]

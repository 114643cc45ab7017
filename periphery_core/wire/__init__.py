"""THE protocol: message kinds, the msgpack header codec and raw tensor frames. Opens no socket.

A message is a list of frames: one msgpack header (a map that always carries the protocol
version `v` and the message `kind`), then one raw frame per tensor, described in the header by
name, dtype and shape. Tensors go out as zero-copy buffers and come back as `np.frombuffer`
views; between processes of one host, big tensors lie in the sender's shared memory instead
and the message names them (shm.py). Nothing is ever pickled. Every frame is validated before
anything is allocated; a bad message raises `WireError` with the reason, and a node logs it
and keeps serving.
"""

from periphery_core.wire.codec import Message, WireError, decode, encode
from periphery_core.wire.protocol import KINDS, PROTOCOL_VERSION, Limits

__all__ = ["KINDS", "PROTOCOL_VERSION", "Limits", "Message", "WireError", "decode", "encode"]

"""A hostile isolated model: it ignores flow control and writes chunk frames for its own
turn straight to the worker's channel socket, as fast as the server reads them."""

import gc
import json
import os
import socket
import struct

from ws_server import AnythingBaseModel


def frame(message):
    payload = json.dumps(message).encode()
    return struct.pack(">I", len(payload)) + payload


class Hog(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        from ws_server.isolation.worker import Worker

        worker = next(o for o in gc.get_objects() if isinstance(o, Worker))
        sid, session = next((k, v) for k, v in worker.sessions.items() if v.model.model is self)
        turn_id = session.turn.get_coro().cr_frame.f_locals["turn_id"]
        fd = worker.outlet.transport.get_extra_info("socket").fileno()
        block = frame(["chunks", sid, turn_id, ["x" * (1 << 20)]])
        # Inline, blocking the worker's own loop, so no frame of the worker's interleaves
        # with these: each is a well-formed chunk, sent regardless of any "pause".
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(True)
        try:
            for _ in range(int(messages[-1]["content"])):
                sock.sendall(block)
        except OSError:
            pass
        yield "done pumping"

"""Pipelined publishing over carebus's messages:stream WebSocket, with the `websockets`
package (an independent client for the process-level tests).

Usage: ws_publish.py URL FRAMES_JSON [PAUSE_SECONDS]

FRAMES_JSON is a JSON array; each element is either an object (sent as a JSON text
frame), a string (sent as that raw text frame), {"binary": "..."} (that text's bytes
sent as a binary frame) or {"binary_message": {...}} (a message encoded here, with
`struct`, in the stream's binary frame format version 1: keys "id", optional
"idempotency_key", "partition_key", "content_type", "headers" (an object), and
"body_hex"). All frames are sent before any answer is read (pipelined), except that with
PAUSE_SECONDS the script waits that long after the first half of the frames. It then
reads one answer per frame and prints them as a JSON array, in the order received.
"""

import asyncio
import json
import struct
import sys

import websockets


def binary_message(m: dict) -> bytes:
    """Encodes a message as the documented binary frame: version 1, id, flags, the
    flagged fields, the headers, then the body (integers big-endian)."""
    fields = [m.get("idempotency_key"), m.get("partition_key"), m.get("content_type")]
    flags = sum(1 << bit for bit, v in enumerate(fields) if v is not None)
    out = struct.pack(">BQB", 1, m["id"], flags)
    for v in fields:
        if v is not None:
            raw = v.encode()
            out += struct.pack(">I", len(raw)) + raw
    headers = m.get("headers", {})
    out += struct.pack(">I", len(headers))
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        out += struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v
    return out + bytes.fromhex(m.get("body_hex", ""))


async def main(url: str, frames: list, pause: float) -> None:
    async with websockets.connect(url, max_size=None, ping_interval=None) as ws:
        half = len(frames) // 2
        for i, frame in enumerate(frames):
            if pause and i == half:
                await asyncio.sleep(pause)
            if isinstance(frame, str):
                await ws.send(frame)
            elif isinstance(frame, dict) and set(frame) == {"binary"}:
                await ws.send(frame["binary"].encode())
            elif isinstance(frame, dict) and set(frame) == {"binary_message"}:
                await ws.send(binary_message(frame["binary_message"]))
            else:
                await ws.send(json.dumps(frame))
        answers = []
        for _ in frames:
            answers.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=30)))
        print(json.dumps(answers))


if __name__ == "__main__":
    pause_arg = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]), pause_arg))

"""Pipelined publishing over carebus's messages:stream WebSocket, with the `websockets`
package (an independent client for the process-level tests).

Usage: ws_publish.py URL FRAMES_JSON [PAUSE_SECONDS]

FRAMES_JSON is a JSON array; each element is either an object (sent as a JSON text
frame), a string (sent as that raw text frame) or {"binary": "..."} (sent as a binary
frame). All frames are sent before any answer is read (pipelined), except that with
PAUSE_SECONDS the script waits that long after the first half of the frames. It then
reads one answer per frame and prints them as a JSON array, in the order received.
"""

import asyncio
import json
import sys

import websockets


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
            else:
                await ws.send(json.dumps(frame))
        answers = []
        for _ in frames:
            answers.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=30)))
        print(json.dumps(answers))


if __name__ == "__main__":
    pause_arg = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]), pause_arg))

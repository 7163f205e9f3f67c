"""Interop peer: the Python `websockets` library (a strict RFC 6455
implementation nobody here wrote) subscribes to a Switchyard topic.

usage: subscribe.py WS_URL TOPIC COUNT

Prints one JSON object per line: the welcome, "ready" once subscribed, each
message received, then closes with 1000 and prints the close it saw.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect


def emit(obj):
    print(json.dumps(obj), flush=True)


async def main(url, topic, count):
    async with connect(url, ping_interval=None) as ws:
        welcome = json.loads(await ws.recv())
        emit(welcome)
        await ws.send(json.dumps({"op": "subscribe", "topic": topic}))
        received = 0
        while received < count:
            frame = json.loads(await ws.recv())
            if frame["op"] == "subscribed":
                emit({"op": "ready", "position": frame["position"]})
            elif frame["op"] == "message":
                emit(frame)
                received += 1
            elif frame["op"] == "heartbeat":
                await ws.send(json.dumps({"op": "ping"}))
        await ws.close(code=1000, reason="done")
        emit({"op": "closed", "code": ws.close_code})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))

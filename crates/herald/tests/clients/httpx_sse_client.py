"""Reads herald's stream with httpx-sse; prints `data:<data>` per event.
Started by tests/blackbox/clients.rs with the stream URL as its argument."""
import sys

import httpx
from httpx_sse import connect_sse

with httpx.Client(timeout=None) as client:
    with connect_sse(client, "GET", sys.argv[1]) as source:
        print("status:%d" % source.response.status_code, flush=True)
        for event in source.iter_sse():
            print("data:" + event.data, flush=True)

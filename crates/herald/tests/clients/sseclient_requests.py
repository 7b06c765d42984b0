"""Reads herald's stream with sseclient-py over requests; prints `data:<data>` per event.
Started by tests/blackbox/clients.rs with the stream URL as its argument."""
import sys

import requests
import sseclient

response = requests.get(sys.argv[1], stream=True, headers={"Accept": "text/event-stream"})
print("status:%d" % response.status_code, flush=True)
for event in sseclient.SSEClient(response).events():
    print("data:" + event.data, flush=True)

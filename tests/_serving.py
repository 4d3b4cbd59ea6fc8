"""A real uvicorn server on 127.0.0.1 (a free port) in a thread, for the service and page tests, and the
small helpers those tests share (images, a tag request, the metrics)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import numpy as np
import uvicorn
from PIL import Image

from ram_edge.runtime import Tagger
from ram_edge.serving import ServeConfig, TaggingService, create_app
from ram_edge.serving.cli import bind


class ServerThread:
    """``with ServerThread(bundle, ServeConfig(...)) as server: httpx.get(server.url + "/healthz")``."""

    def __init__(self, bundle: Path, config: ServeConfig = ServeConfig(), **tagger_options):
        self.service = TaggingService(Tagger(bundle, **tagger_options), config, close_tagger=True)
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service), log_level="warning",
                                                    access_log=False))
        self.thread: Optional[threading.Thread] = None

    def __enter__(self) -> "ServerThread":
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample of Prometheus text exposition (0 when absent); labels in their declared order."""
    selector = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(selector + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def png(width: int = 80, height: int = 60, seed: int = 0) -> bytes:
    """A PNG of random pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def post_tag(server: ServerThread, images, timeout: float = 60, headers=None, **fields) -> httpx.Response:
    """POST /v1/tag with ``images`` (bytes) as repeated ``images`` files and ``fields`` as form fields."""
    files = [("images", (f"image{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(server.url + "/v1/tag", files=files or None, data={k: str(v) for k, v in fields.items()},
                      timeout=timeout, headers=headers)


def metrics(server: ServerThread) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text

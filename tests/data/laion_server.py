"""A loopback HTTP image server and LAION-like metadata for download tests (127.0.0.1 only, bounded)."""
import http.server
import io
import socket
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image_bytes(width, height, seed, image_format="PNG"):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format)
    return buffer.getvalue()


def closed_port():
    """A port on 127.0.0.1 with nothing listening (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackImageServer:
    """Serves ``{path: bytes}`` on 127.0.0.1 (404 for other paths); stops after ``max_requests`` requests.

    Use as a context manager; ``requests`` counts the GET requests answered.
    """

    def __init__(self, files, max_requests=200):
        self.files, self.max_requests, self.requests = dict(files), max_requests, 0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                with server._lock:
                    server.requests += 1
                    over = server.requests > server.max_requests
                body = None if over else server.files.get(self.path)
                if body is None:
                    self.send_error(503 if over else 404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._http.server_port}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=10)


def write_laion_parquet(path, rows):
    """rows: dicts with url, caption, width, height, aesthetic, pwatermark -> aesthetics-v2 column names."""
    table = pa.table({
        "URL": pa.array([r["url"] for r in rows], pa.string()),
        "TEXT": pa.array([r["caption"] for r in rows], pa.string()),
        "WIDTH": pa.array([float(r["width"]) for r in rows], pa.float64()),
        "HEIGHT": pa.array([float(r["height"]) for r in rows], pa.float64()),
        "similarity": pa.array([0.3] * len(rows), pa.float64()),
        "punsafe": pa.array([0.01] * len(rows), pa.float64()),
        "pwatermark": pa.array([r.get("pwatermark", 0.1) for r in rows], pa.float64()),
        "AESTHETIC_SCORE": pa.array([r.get("aesthetic", 6.5) for r in rows], pa.float64()),
    })
    pq.write_table(table, path)
    return path

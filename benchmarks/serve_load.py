#!/usr/bin/env python
"""Serving under load (issue 44): simulated users on loopback against the HTTP API, fisedit's edit sessions against
the same server answering every edit by a dense regeneration.

    python benchmarks/serve_load.py                                   # 6 users, a generate and 5 edits each
    python benchmarks/serve_load.py --users 2 --edits 1 --steps 2 --out /tmp/b      # a quick check

One server process per contender, started by this script on 127.0.0.1, both the same FastAPI app
(`serve.api.create_app`) under uvicorn, one replica each, serving one request at a time as `SessionService` does:

- **fisedit**: `create_app(SessionService(pipe, ...))`, what `fisedit serve` runs on each Ray replica (every state
  saved under the data folder; at most `--max-live` sessions in memory, the others reopened from disk);
- **dense**: the same routes over `DenseService` (below), which keeps each session's prompt, seed and picture and
  answers an edit by regenerating the edited prompt from the same seed and pasting the previous picture outside the
  mask: the visible result of a diffusers server without fisedit.

Each user is a thread: it creates a session (a generated picture, `--steps` steps) and makes `--edits` edits of it, each
a colour change of the scene's objects with a user mask (ellipses of 5-30% of the picture at varying places, PNG at
image resolution). Before the load, one warm-up session (a generate and an edit) per server compiles what the first
request would; it is not counted. Measured per contender: the latency of every generate and edit request (p50, p95),
edits per minute over the load's wall time, the server process's resident memory sampled every 0.25 s (peak; median of
the first and of the last quarter of the load, which show any growth), the service's evictions and reopenings
(`GET /v1/service`), and requests that failed. The load is bounded: `--users` threads, `--edits` edits each, and
`--time-limit` seconds, after which users stop where they are (reported).

Results: ``<out>/serve-load_<model>-<users>u-<max live>live.{json,md}``. The goal printed is issue 44's: at least 2x the edits per
minute of dense serving at the same p95, memory within the budget, nothing lost.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling results_io, also when a test imports this file
from results_io import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent
SOURCES = [
    "a red circle and a blue square on a gray background",
    "a green triangle and a yellow circle on a gray background",
    "a blue square and a red triangle on a gray background",
]
COLOURS = ["red", "green", "blue", "yellow"]
MASK_FRACTIONS = [0.05, 0.10, 0.15, 0.20, 0.30]
MASK_CENTERS = [(0.3, 0.3), (0.6, 0.4), (0.45, 0.7), (0.7, 0.7), (0.5, 0.5)]


# --- the servers ---------------------------------------------------------------------------------------------------


class DenseService:
    """The routes of `serve.api` answered without fisedit: a session is its prompt, seed and current picture; an
    edit regenerates the edited prompt densely from the seed and keeps the current picture outside the mask."""

    def __init__(self, pipe, steps: int, compute=None):
        self.pipe, self.steps, self.compute = pipe, steps, compute
        self._sessions: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def create(self) -> str:
        import secrets

        sid = secrets.token_hex(8)
        self._sessions[sid] = {"history": []}
        return sid

    def _regenerate(self, prompt: str, seed: int, steps: int):
        """The pipeline's picture of `prompt`, on the compute thread when there is one (as `SessionService`)."""
        return self._dense(prompt, seed, steps) if self.compute is None else self.compute.call(
            self._dense, prompt, seed, steps)

    def _dense(self, prompt: str, seed: int, steps: int):
        import torch

        from fisedit_compiler.editing.session import EditResult, PhaseStats

        start = time.perf_counter()
        image = self.pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).images[0]
        stats = {"dense": PhaseStats(unet_calls=steps, seconds=time.perf_counter() - start)}
        return EditResult(prompt, [image], torch.empty(0), None, stats)

    def generate(self, sid: str, prompt: str, seed: int = 0, steps: int | None = None):
        with self._lock:
            session = self._session(sid)
            result = self._regenerate(prompt, seed, steps or self.steps)
            session.update(seed=seed, steps=steps or self.steps, history=[prompt], image=result.images[0])
            return result

    def edit(self, sid: str, prompt: str, mask: Any = None, keep: bool = True):
        import numpy as np
        from PIL import Image

        from fisedit_compiler.inputs import as_mask

        with self._lock:
            session = self._session(sid)
            result = self._regenerate(prompt, session["seed"], session["steps"])
            if mask is not None:
                width, height = session["image"].size
                scale = self.pipe.vae_scale_factor
                latent = as_mask(mask, (height // scale, width // scale), scale_factor=scale)
                inside = Image.fromarray(latent.numpy().astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
                result.images[0] = Image.composite(result.images[0], session["image"], inside)
                result.mask = latent
            if keep:
                session["history"].append(prompt)
                session["image"] = result.images[0]
            return result

    def history(self, sid: str) -> list[str]:
        return list(self._session(sid)["history"])

    def delete(self, sid: str) -> None:
        with self._lock:
            self._session(sid)
            del self._sessions[sid]

    def stats(self) -> dict[str, int]:
        return {"pid": os.getpid(), "sessions": len(self._sessions), "live": len(self._sessions), "evicted": 0,
                "reopened": 0}

    def _session(self, sid: str) -> dict[str, Any]:
        from fisedit_compiler.service import ServiceError

        if sid not in self._sessions:
            raise ServiceError(f"no session {sid}", "unknown")
        return self._sessions[sid]


def serve(args) -> None:
    """The server process of one contender (`--serve fisedit|dense`)."""
    import uvicorn

    from fisedit_compiler.models import load_pipeline
    from fisedit_compiler.runtime.collector import freeze_long_lived_objects
    from fisedit_compiler.serve.api import create_app
    from fisedit_compiler.service import ComputeThread, SessionService
    from fisedit_compiler.training.quality import SHAPES_MODEL

    compute = ComputeThread() if args.compute_thread else None  # as `fisedit app` and `fisedit serve` run
    pipe = (compute.call if compute else lambda f, *a: f(*a))(load_pipeline, args.model or str(SHAPES_MODEL))
    pipe.set_progress_bar_config(disable=True)
    if args.serve == "fisedit":
        service = SessionService(pipe, Path(args.data) / "sessions", num_inference_steps=args.steps,
                                 max_live=args.max_live, compute=compute)
        service.warm_up()  # as `fisedit serve` starts its replicas
    else:
        service = DenseService(pipe, args.steps, compute)
        freeze_long_lived_objects()  # (as warm_up ends: the pipeline out of the collector's scans)
    uvicorn.run(create_app(service), host="127.0.0.1", port=args.port, log_level="warning")


# --- the load ------------------------------------------------------------------------------------------------------


class Server:
    """A contender's server process on 127.0.0.1 and a sampler of its resident memory."""

    def __init__(self, kind: str, args, data: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--port", str(self.port),
                   "--data", str(data), "--steps", str(args.steps), "--max-live", str(args.max_live)]
        if not args.compute_thread:
            command.append("--no-compute-thread")
        if args.model:
            command += ["--model", args.model]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.samples: list[tuple[float, int]] = []  # (seconds since start, resident bytes)
        self._stop = threading.Event()

    def wait_ready(self, client, timeout: float = 300.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.process.stderr.read()}")
            try:
                if client.get(f"{self.url}/v1/service").status_code == 200:
                    return time.monotonic() - start
            except Exception:  # not listening yet
                pass
            time.sleep(0.25)
        raise TimeoutError("the server did not answer within 5 minutes")

    def sample_memory(self) -> None:
        start = time.monotonic()

        def loop():
            while not self._stop.wait(0.25):
                try:
                    status = Path(f"/proc/{self.process.pid}/status").read_text()
                except OSError:
                    return
                rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS"))
                self.samples.append((time.monotonic() - start, rss))

        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def mask_png(size: int, k: int) -> bytes:
    from PIL import Image

    from fisedit_compiler.editing.masks import ellipse_mask

    mask = ellipse_mask(size, MASK_FRACTIONS[k % len(MASK_FRACTIONS)], center=MASK_CENTERS[k % len(MASK_CENTERS)])
    buffer = io.BytesIO()
    Image.fromarray(mask.numpy().astype("uint8") * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def edited_prompt(source: str, k: int) -> str:
    """The source with one colour word replaced by another (each edit a different one)."""
    words = source.split()
    colours = [i for i, w in enumerate(words) if w in COLOURS]
    i = colours[k % len(colours)]
    words[i] = COLOURS[(COLOURS.index(words[i]) + 1 + k) % len(COLOURS)]
    return " ".join(words)


def user(client, url: str, u: int, edits: int, deadline: float, log: dict[str, list]) -> None:
    """One simulated user: a session, then its edits (each building on the last)."""
    import base64

    from PIL import Image

    source = SOURCES[u % len(SOURCES)]
    start = time.perf_counter()
    made = client.post(f"{url}/v1/sessions", data={"prompt": source, "seed": str(u)})
    if made.status_code != 200:
        log["failed"].append(f"user {u} generate: {made.status_code} {made.text[:200]}")
        return
    log["generate"].append(time.perf_counter() - start)
    sid = made.json()["id"]
    width = Image.open(io.BytesIO(base64.b64decode(made.json()["image"]))).size[0]
    prompt = source
    for k in range(edits):
        if time.monotonic() > deadline:
            log["cut"].append(f"user {u}: {edits - k} edits not made (time limit)")
            return
        prompt = edited_prompt(prompt, k + u)
        start = time.perf_counter()
        done = client.post(f"{url}/v1/sessions/{sid}/edits", data={"prompt": prompt},
                           files={"mask": ("mask.png", mask_png(width, k + u), "image/png")})  # at image resolution
        if done.status_code != 200:
            log["failed"].append(f"user {u} edit {k}: {done.status_code} {done.text[:200]}")
            continue
        log["edit"].append(time.perf_counter() - start)
        log["edit_end"].append(time.monotonic())


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_contender(kind: str, args, root: Path) -> dict[str, Any]:
    import httpx

    server = Server(kind, args, root / kind)
    try:
        with httpx.Client(timeout=None) as client:
            ready = server.wait_ready(client)
            warm = {"generate": [], "edit": [], "edit_end": [], "failed": [], "cut": []}
            start = time.perf_counter()
            user(client, server.url, len(SOURCES) * 10, 1, float("inf"), warm)  # compiles what the first request would
            warm_up = time.perf_counter() - start
            server.sample_memory()
            log = {"generate": [], "edit": [], "edit_end": [], "failed": [], "cut": []}
            deadline = time.monotonic() + args.time_limit
            start, begin = time.perf_counter(), time.monotonic()
            threads = [threading.Thread(target=user, args=(client, server.url, u, args.edits, deadline, log))
                       for u in range(args.users)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            service = client.get(f"{server.url}/v1/service").json()
    finally:
        server.stop()
    memory = [rss for _, rss in server.samples]
    quarter = max(1, len(memory) // 4)
    return {
        "server_ready_seconds": ready, "warm_up_seconds": warm_up, "warm_up_failed": warm["failed"],
        "wall_seconds": wall, "edits": len(log["edit"]), "generates": len(log["generate"]),
        "edits_per_minute": 60 * len(log["edit"]) / wall if wall else None,
        "edit_p50": percentile(log["edit"], 0.5), "edit_p95": percentile(log["edit"], 0.95),
        "generate_p50": percentile(log["generate"], 0.5), "generate_p95": percentile(log["generate"], 0.95),
        "edit_seconds": log["edit"], "edit_done_at": [t - begin for t in log["edit_end"]],
        "failed": log["failed"], "cut": log["cut"], "service": service,
        "rss_peak": max(memory, default=None),
        "rss_first_quarter": statistics.median(memory[:quarter]) if memory else None,
        "rss_last_quarter": statistics.median(memory[-quarter:]) if memory else None,
        "rss_samples": server.samples,
    }


def report(data: dict[str, Any]) -> str:
    a = data["args"]
    lines = [f"# Serving under load: {a['users']} users, a generate and {a['edits']} edits each ({a['steps']} steps, "
             f"masks 5-30%), one replica", "",
             f"Machine: {data['machine']['cpu']}, git {data['machine']['git']}, {data['machine']['date']}; model "
             f"{data['model']}; at most {a['max_live']} sessions in memory (fisedit)", "",
             "| server | edits | edits/min | edit p50 | edit p95 | generate p50 | peak RSS | RSS first / last quarter "
             "| evicted / reopened | failed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    gib = 2 ** 30
    for kind in ("dense", "fisedit"):
        r = data["contenders"][kind]
        lines.append(
            f"| {kind} | {r['edits']} | {r['edits_per_minute']:.1f} | {r['edit_p50']:.2f} s | {r['edit_p95']:.2f} s | "
            f"{r['generate_p50']:.2f} s | {r['rss_peak'] / gib:.2f} GiB | {r['rss_first_quarter'] / gib:.2f} / "
            f"{r['rss_last_quarter'] / gib:.2f} GiB | {r['service']['evicted']} / {r['service']['reopened']} | "
            f"{len(r['failed'])} |")
    c = data["comparison"]
    lines += ["", f"fisedit against dense serving: **{c['throughput_ratio']:.2f}x the edits per minute**, edit p95 "
                  f"{c['p95_ratio']:.2f}x dense's (goal: >= 2x the edits per minute at the same p95: "
                  f"{'met' if c['goal_met'] else 'not met'}).",
              "", "Warm-up (one session, not counted): " + ", ".join(
                  f"{k} {data['contenders'][k]['warm_up_seconds']:.1f} s" for k in ("dense", "fisedit")) + "."]
    for kind in ("dense", "fisedit"):
        for what in ("failed", "cut"):
            for line in data["contenders"][kind][what]:
                lines.append(f"- {kind} {what}: {line}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--edits", type=int, default=5, help="edits per user")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-live", type=int, default=4, help="sessions fisedit keeps in memory (the service's)")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds of load per contender at most")
    p.add_argument("--model", help="a local diffusers pipeline folder (default: the embedded shapes model)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--no-compute-thread", dest="compute_thread", action="store_false",
                   help="servers run requests on uvicorn's threads, not on the thread that loaded the model")
    p.add_argument("--serve", choices=("fisedit", "dense"), help=argparse.SUPPRESS)  # the server processes'
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.users, args.edits, args.steps, args.max_live) < 1 or args.time_limit <= 0:
        p.error("--users, --edits, --steps and --max-live are at least 1, --time-limit above 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.serve:
        serve(args)
        return {}
    with tempfile.TemporaryDirectory(prefix="fisedit-serve-load-") as root:
        contenders = {kind: run_contender(kind, args, Path(root)) for kind in ("dense", "fisedit")}
    dense, ours = contenders["dense"], contenders["fisedit"]
    ratio = ours["edits_per_minute"] / dense["edits_per_minute"]
    p95 = ours["edit_p95"] / dense["edit_p95"]
    data = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k not in ("serve", "port", "data",
                                                                                          "out")},
            "model": args.model or "embedded shapes model", "contenders": contenders,
            "comparison": {"throughput_ratio": ratio, "p95_ratio": p95,
                           "goal_met": ratio >= 2 and p95 <= 1 and not ours["failed"]}}
    data["args"]["model"] = args.model
    text = report(data)
    model = Path(args.model).name if args.model else "shapes"
    write_results(args.out, f"serve-load_{model}-{args.users}u-{args.max_live}live", data, text)
    print(text)
    return data


if __name__ == "__main__":
    main()

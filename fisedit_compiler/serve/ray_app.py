"""The HTTP API on Ray Serve (`fisedit serve`): N replicas of an edit engine, each request routed to the replica that
holds its session's cache.

    app = build_app(model=None, data="data", replicas=2)   # the embedded shapes model by default
    serve.run(app, route_prefix="/")                       # the routes of `serve.api` on Serve's HTTP proxy

Two deployments:

- `EditEngine` (N replicas): a pipeline, its compiled model and a `SessionService` over the shared data folder, whose
  sessions' records share one memory budget per replica;
- `Gateway` (one replica): the FastAPI app of `serve.api.create_app`, over a `RemoteService` that calls the engine.

Routing is Ray Serve's **model multiplexing**, keyed by session id: every call of a session goes through
`handle.options(multiplexed_model_id=sid)`, and Serve sends it to a replica that has already served that id (it
tracks the ids each replica reports from its `@serve.multiplexed` loader), else to the least loaded one, which then
reopens the session from its last saved state. Multiplexing was chosen over a custom router because a session is
exactly what it models (a per-request key, an LRU of them per replica, a load on a miss) and it needs no code in
Serve's request path. Every state of a session is saved under the data folder (`SessionService`), so a replica that
dies loses at most the request in flight: the gateway retries it on another replica, which reopens the session from
disk.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from ..service import SessionService

try:
    from ray import serve
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
except ImportError as e:  # an optional extra
    raise ImportError("serving on Ray needs Ray Serve: pip install 'fisedit-compiler[serve]' 'ray[serve]'") from e

SESSIONS_PER_REPLICA = 4  # sessions a replica keeps in memory (the multiplexing LRU and the service's)
RETRY_SECONDS = 60.0  # how long the gateway retries a call whose replica died


@serve.deployment
class EditEngine:
    """One replica: the pipeline (`model`: a local diffusers folder, None for the embedded shapes model) and a
    `SessionService` over `data`/sessions, shared with the other replicas through the file system; sessions idle for
    `idle_seconds` leave its memory (their next request reopens them, here or elsewhere)."""

    def __init__(self, model: str | None, data: str, steps: int = 20, idle_seconds: float = 900.0):
        from ..models import load_pipeline
        from ..service import ComputeThread
        from ..training.quality import SHAPES_MODEL

        def load():
            import torch

            pipe = load_pipeline(model or str(SHAPES_MODEL))
            if torch.cuda.is_available():  # a replica given a GPU (Ray sets which one it sees)
                pipe.to("cuda")
            return pipe

        compute = ComputeThread()  # the model loaded and run on one thread (`service.compute`)
        self.service = SessionService(compute.call(load), Path(data) / "sessions", num_inference_steps=steps,
                                      max_live=SESSIONS_PER_REPLICA, compute=compute)
        self.service.warm_up()  # compiled, an edit's programs bound: a user's first requests wait for none of it
        self.service.start_idle_eviction(idle_seconds)  # an idle session is saved already: dropped from memory

    @serve.multiplexed(max_num_models_per_replica=SESSIONS_PER_REPLICA)
    async def _session(self, sid: str) -> str:
        """Serve's loader of a session id on this replica: the service reopens the session on its first request."""
        return sid

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`SessionService.<method>(*args, **kwargs)` on this replica, off the event loop; a session's call names it
        as the multiplexed id."""
        sid = serve.get_multiplexed_model_id()
        if sid:
            await self._session(sid)
        return await asyncio.to_thread(getattr(self.service, method), *args, **kwargs)

    def pid(self) -> int:
        import os

        return os.getpid()


class RemoteService:
    """The `SessionService` calls of `serve.api`'s routes, made on the engine replicas: a session's calls with its id
    as the multiplexed model id, `create` on any replica. Errors raised there are raised here as themselves; a call
    whose replica died is retried (for up to `RETRY_SECONDS`) on another one."""

    def __init__(self, engine):
        self.engine = engine

    def _call(self, method: str, sid: str | None, *args: Any, **kwargs: Any) -> Any:
        handle = self.engine if sid is None else self.engine.options(multiplexed_model_id=sid)
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            try:
                return handle.call.remote(method, *args, **kwargs).result()
            except RayTaskError as e:  # the service's own error: raised as it is
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else e) from None
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)  # the controller replaces the replica; the session reopens from disk

    def create(self) -> str:
        return self._call("create", None)

    def stats(self) -> dict[str, int]:
        """The stats of one replica (any: `pid` says which)."""
        return self._call("stats", None)

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda sid, *args, **kwargs: self._call(method, sid, sid, *args, **kwargs)


@serve.deployment
@serve.ingress()
class Gateway:
    """The HTTP ingress: `serve.api`'s routes over the engine replicas."""

    def __init__(self, engine):
        self.service = RemoteService(engine)

    def __serve_build_asgi_app__(self):
        from .api import create_app

        return create_app(self.service)


def build_app(model: str | None, data: str | Path, replicas: int = 1, steps: int = 20, idle_seconds: float = 900.0,
              gpus_per_replica: float = 0):
    """The Serve application: a gateway over `replicas` engine replicas sharing the data folder `data`, each given
    `gpus_per_replica` GPUs (its pipeline then runs on one)."""
    engine = EditEngine.options(num_replicas=replicas, ray_actor_options={"num_gpus": gpus_per_replica}).bind(
        model, str(Path(data).resolve()), steps, idle_seconds)
    return Gateway.bind(engine)

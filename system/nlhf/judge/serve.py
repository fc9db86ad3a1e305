"""The judge as a Ray Serve service: batched ``prefer`` through a handle, optional ``POST /prefer``.

Used two ways:

* by the training driver, inside its cluster: ``handle = start_judge_service(cfg.judge)``, then
  ``handle.prefer.remote(prompts, responses_a, responses_b).result()`` -> ``list[float]`` and
  ``handle.stats.remote().result()`` -> counters for metrics;
* standalone: ``nlhf judge serve --config X`` -> :func:`serve_judge`, which also opens HTTP.

Batching: each call is split into chunks of at most ``serve.max_batch_size`` pairs; chunks from
concurrent calls are merged (``@serve.batch``, waiting up to ``serve.batch_wait_timeout_s``)
into one judge call of at most ``max_batch_size`` pairs. If a merged call fails (one caller sent
an over-long pair in reject mode, say), each chunk is re-run alone so only its caller gets the
error.

HTTP (``serve.http.enabled``): ``POST /prefer`` with JSON ``{"prompts": [...], "responses_a":
[...], "responses_b": [...]}`` answers ``{"probabilities": [...]}``. Errors answer JSON
``{"error": "..."}``: 400 (body is not JSON or not that object), 401 (bearer token missing or
wrong), 404/405 (other path or method), 422 (the judge refused the request: mismatched lengths,
an empty prompt, a non-string, an over-long pair in reject mode, an unknown action), 500 only
when the judge itself fails (e.g. out of memory). A bearer token
(``serve.http.token`` or the environment variable named by ``serve.http.token_env``) is
required when the host is not loopback, and checked whenever one is configured.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from nlhf.checks import check_http_security, is_loopback, resolve_token  # noqa: F401  (HTTP security, re-exported)
from nlhf.config import ConfigError, HttpConfig, JudgeConfig
from nlhf.judge.base import JudgeError, check_request

STATS_NAMESPACE = "nlhf-judge"


# ----------------------------------------------------------------------------- HTTP security
def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_ok(header: str | None, token_sha256: str | None) -> bool:
    """Whether an ``Authorization`` header value carries the token whose SHA-256 is ``token_sha256``
    (constant-time compare; always True when no token is required)."""
    if token_sha256 is None:
        return True
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return False
    return hmac.compare_digest(_digest(value.strip()), token_sha256)


# ----------------------------------------------------------------------------- stats
class JudgeStats:
    """Service-wide counters, shared by every replica (a 0-CPU Ray actor named after the app)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        self.requests = self.pairs = self.errors = self.truncations = self.batches = self.batch_pairs = 0
        self.latency_sum = self.latency_max = 0.0
        self.replicas: set[str] = set()

    def record(self, replica: str, requests: int, pairs: int, errors: int, latency_s: float, batches: int,
               batch_pairs: int, truncations: int) -> None:
        """Add one replica's deltas."""
        self.replicas.add(replica)
        self.requests += requests
        self.pairs += pairs
        self.errors += errors
        self.latency_sum += latency_s
        self.latency_max = max(self.latency_max, latency_s)
        self.batches += batches
        self.batch_pairs += batch_pairs
        self.truncations += truncations

    def snapshot(self) -> dict[str, float]:
        """See :meth:`JudgeService.stats`."""
        done = self.requests + self.errors
        return {
            "requests": self.requests,
            "pairs": self.pairs,
            "errors": self.errors,
            "truncations": self.truncations,
            "batches": self.batches,
            "mean_batch_pairs": self.batch_pairs / self.batches if self.batches else 0.0,
            "mean_latency_s": self.latency_sum / done if done else 0.0,
            "max_latency_s": self.latency_max,
            "busy_s": self.latency_sum,
            "replicas": len(self.replicas),
        }


def _stats_actor_name(app: str) -> str:
    return f"judge-stats:{app}"


# ----------------------------------------------------------------------------- deployment
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _chunk_pairs(chunks: list[tuple[list[str], list[str], list[str]]]) -> int:
    return sum(len(c[0]) for c in chunks)


class JudgeService:
    """Ray Serve deployment body: one judge per replica, batched across calls.

    Args (passed by :func:`start_judge_service` through ``bind``):
        cfg: ``JudgeConfig.model_dump()``.
        matrix, actions: for ``kind == "matrix"``.
        token_sha256: SHA-256 hex of the bearer token HTTP requests must carry; None: no check.
        app: Serve application name (names the shared stats actor).
    """

    def __init__(self, cfg: dict[str, Any], matrix: np.ndarray | None, actions: list[str] | None,
                 token_sha256: str | None, app: str) -> None:
        from nlhf.judge.factory import build_judge

        self.cfg = JudgeConfig.model_validate(cfg)
        if self.cfg.serve.torch_threads:  # before the judge is built (an LLM judge's vLLM fixes it after)
            import torch

            torch.set_num_threads(self.cfg.serve.torch_threads)
        self.judge = build_judge(self.cfg, matrix=matrix, actions=actions)
        self.max_batch_size = self.cfg.serve.max_batch_size
        self._run_batch.set_max_batch_size(self.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(self.cfg.serve.batch_wait_timeout_s)
        self.token_sha256 = token_sha256
        # One thread runs the judge: torch/vLLM never block the replica's event loop, and calls never overlap.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (unit use)
            self.replica = f"pid{os.getpid()}"
        self._stats_actor = None
        try:
            import ray

            self._stats_actor = ray.get_actor(_stats_actor_name(app), namespace=STATS_NAMESPACE)
        except Exception:  # noqa: BLE001 - deployed without start_judge_service: local counters only
            pass
        self._local = JudgeStats()
        self._pending = {"batches": 0, "batch_pairs": 0, "truncations": 0}

    # ------------------------------------------------------------------ batching
    def _judge_chunks(self, chunks: list[tuple[list[str], list[str], list[str]]]) -> list[list[float]]:
        before = int(getattr(self.judge, "truncations", 0))
        probs = self.judge.prefer([p for c in chunks for p in c[0]], [a for c in chunks for a in c[1]],
                                  [b for c in chunks for b in c[2]])
        self._pending["truncations"] += int(getattr(self.judge, "truncations", 0)) - before
        out, start = [], 0
        for c in chunks:
            out.append(probs[start:start + len(c[0])].tolist())
            start += len(c[0])
        return out

    async def _call_judge(self, chunks: list[tuple[list[str], list[str], list[str]]]) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._judge_chunks, chunks)

    async def _run_batch_impl(self, chunks: list[tuple[list[str], list[str], list[str]]]) -> list[Any]:
        self._pending["batches"] += 1
        self._pending["batch_pairs"] += sum(len(c[0]) for c in chunks)
        try:
            return await self._call_judge(chunks)
        except JudgeError as merged_error:
            if len(chunks) == 1:
                return [merged_error]
        results: list[Any] = []
        for c in chunks:  # isolate the chunk(s) at fault
            try:
                results.extend(await self._call_judge([c]))
            except JudgeError as e:
                results.append(e)
        return results

    # Sizes count pairs; the decorator's limits are replaced per replica in __init__ from cfg.serve.
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=_chunk_pairs)
    async def _run_batch(self, chunks: list[tuple[list[str], list[str], list[str]]]) -> list[Any]:
        return await self._run_batch_impl(chunks)

    # ------------------------------------------------------------------ API
    async def prefer(self, prompts: Sequence[str], responses_a: Sequence[str],
                     responses_b: Sequence[str]) -> list[float]:
        """P(responses_a[i] > responses_b[i] | prompts[i]) for each i, as a list of B floats in [0, 1].

        Raises:
            JudgeError: mismatched lengths, non-strings, an empty prompt, an over-long pair in
                reject mode, an unknown action (matrix), or an invalid judge output; the message
                names the judge and the pair.
        """
        t0 = time.perf_counter()
        n = 0
        try:
            check_request(self.judge.name, prompts, responses_a, responses_b)
            prompts, responses_a, responses_b = list(prompts), list(responses_a), list(responses_b)
            n = len(prompts)
            step = self.max_batch_size
            starts = list(range(0, n, step))
            results = await asyncio.gather(*[
                self._run_batch((prompts[s:s + step], responses_a[s:s + step], responses_b[s:s + step]))
                for s in starts
            ])
            out: list[float] = []
            for s, r in zip(starts, results):
                if isinstance(r, JudgeError):
                    where = f" (in pairs {s}..{s + step - 1} of the request)" if len(starts) > 1 else ""
                    raise JudgeError(f"{r}{where}")
                out.extend(r)
        except JudgeError:
            await self._record(0, 0, 1, time.perf_counter() - t0)
            raise
        await self._record(1, n, 0, time.perf_counter() - t0)
        return out

    async def _record(self, requests: int, pairs: int, errors: int, latency_s: float) -> None:
        pending, self._pending = self._pending, {"batches": 0, "batch_pairs": 0, "truncations": 0}
        delta = dict(replica=self.replica, requests=requests, pairs=pairs, errors=errors, latency_s=latency_s,
                     **pending)
        self._local.record(**delta)
        if self._stats_actor is not None:
            try:
                await self._stats_actor.record.remote(**delta)
            except Exception:  # noqa: BLE001 - stats never fail a request
                self._stats_actor = None

    async def stats(self) -> dict[str, float]:
        """Service-wide counters since start (this replica's only when the shared actor is gone):
        ``requests`` (successful calls), ``pairs`` (judged pairs), ``errors`` (refused calls),
        ``truncations`` (pairs shortened to max_length), ``batches``, ``mean_batch_pairs``,
        ``mean_latency_s`` / ``max_latency_s`` (per call, inside the replica, seconds), ``busy_s`` (their
        sum: the service's busy time), ``replicas``, and ``replica_peak_rss_gb`` (peak RSS of the
        replica that answered, GiB)."""
        import resource

        rss = {"replica_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
        if self._stats_actor is not None:
            try:
                return {**await self._stats_actor.snapshot.remote(), **rss}
            except Exception:  # noqa: BLE001
                self._stats_actor = None
        return {**self._local.snapshot(), **rss}

    async def info(self) -> dict[str, Any]:
        """The judge's name, the config it was built from (``JudgeConfig.model_dump()``, token
        removed) and the replica's torch threads."""
        import torch

        cfg = self.cfg.model_dump()
        cfg["serve"]["http"]["token"] = None
        return {"judge": self.judge.name, "config": cfg, "torch_threads": torch.get_num_threads()}

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, request: Any) -> Any:
        """``POST /prefer`` (see the module docstring)."""
        from starlette.responses import JSONResponse

        if not bearer_ok(request.headers.get("authorization"), self.token_sha256):
            return _error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                          {"WWW-Authenticate": "Bearer"})
        if not request.url.path.rstrip("/").endswith("/prefer"):
            return _error(404, f"no route {request.url.path!r}; use POST /prefer")
        if request.method != "POST":
            return _error(405, f"method {request.method} not allowed; use POST /prefer", {"Allow": "POST"})
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"request body is not valid JSON: {e}")
        fields = ("prompts", "responses_a", "responses_b")
        if not isinstance(body, dict):
            return _error(400, f"request body must be a JSON object with keys {list(fields)}")
        missing = [f for f in fields if f not in body]
        if missing:
            return _error(400, f"request body is missing {missing}; expected keys {list(fields)}")
        for f in fields:
            if not isinstance(body[f], list):
                return _error(400, f"{f} must be a list of strings, got {type(body[f]).__name__}")
        try:
            probs = await self.prefer(body["prompts"], body["responses_a"], body["responses_b"])
        except JudgeError as e:
            return _error(422, str(e))
        except Exception as e:  # noqa: BLE001 - a fault of the judge, not of the request
            return _error(500, f"judge {self.judge.name} failed: {type(e).__name__}: {e}")
        return JSONResponse({"probabilities": probs})

    def __del__(self) -> None:
        judge = getattr(self, "judge", None)
        close = getattr(judge, "close", None)
        if callable(close):
            close()
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)


# ----------------------------------------------------------------------------- start / stop
def _serve_running_http() -> tuple[str, int] | None:
    """(host, port) of the HTTP proxy of the Serve instance already running on this cluster, or
    None when Serve is not running (or its config cannot be read)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return None
        http = client.http_config
        return http.host, http.port
    except Exception:  # noqa: BLE001 - private API changed: skip the check
        return None


def start_judge_service(cfg: JudgeConfig, *, name: str = "judge", matrix: np.ndarray | None = None,
                        actions: list[str] | None = None, route_prefix: str = "/") -> Any:
    """Deploy the judge ``cfg`` names as the Serve application ``name`` and return its handle.

    Assumes ``ray.init`` was done. Starts Serve when it is not running: with its HTTP proxy on
    ``cfg.serve.http.host:port`` when ``cfg.serve.http.enabled`` (``POST {route_prefix}prefer``),
    else without any proxy. Replicas, CPUs/GPUs per replica and batching come from ``cfg.serve``.
    Blocks until every replica is up (the judge is loaded).

    Args:
        cfg: the judge section.
        name: Serve application name (one per judge service on a cluster).
        matrix, actions: the game's preference matrix and action strings (``kind == "matrix"``).
        route_prefix: HTTP route prefix of the app (only with HTTP enabled).
    Returns:
        ``DeploymentHandle``: ``handle.prefer.remote(prompts, a, b).result()`` -> list[float];
        ``handle.stats.remote().result()`` -> dict (see :meth:`JudgeService.stats`).
    Raises:
        ConfigError: HTTP on a non-loopback host without a token, or Serve already running on
            this cluster with its HTTP proxy elsewhere than ``host:port``.
        JudgeError: missing matrix/actions for ``kind == "matrix"``, or no ``path`` for the others.
        FileNotFoundError: ``cfg.path`` is not a folder (checked here; replicas read the same path,
            so on a multi-node cluster it must be on shared storage).
        RuntimeError: from Serve, when the judge fails to load in its replica (3 attempts).
    """
    import ray

    if cfg.kind == "matrix" and (matrix is None or actions is None):
        raise JudgeError("judge matrix: start_judge_service needs matrix= and actions= for judge.kind 'matrix'")
    if cfg.kind != "matrix":
        if cfg.path is None:
            raise JudgeError(f"judge {cfg.kind}: judge.path is required for judge.kind {cfg.kind!r}")
        if not os.path.isdir(os.path.expanduser(cfg.path)):
            raise FileNotFoundError(f"judge {cfg.kind}: judge.path is not a folder: {cfg.path}")
    http = cfg.serve.http
    token = check_http_security(http) if http.enabled else None
    running = _serve_running_http()
    if running is None:
        if http.enabled:
            serve.start(proxy_location="HeadOnly", http_options={"host": http.host, "port": http.port})
        else:
            serve.start(proxy_location="Disabled")
    elif http.enabled and (running[0], running[1]) != (http.host, http.port):
        raise ConfigError(
            f"judge.serve.http: Serve already runs on this cluster with HTTP at {running[0]}:{running[1]}, "
            f"not {http.host}:{http.port} (HTTP options are fixed when Serve starts)"
        )

    stats = ray.remote(num_cpus=0)(JudgeStats).options(
        name=_stats_actor_name(name), namespace=STATS_NAMESPACE, get_if_exists=True).remote()
    ray.get(stats.reset.remote())

    actor_options: dict[str, Any] = {"num_cpus": cfg.serve.num_cpus}
    if cfg.serve.num_gpus > 0:
        actor_options["num_gpus"] = cfg.serve.num_gpus
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "VLLM_CACHE_ROOT"):
        if key in os.environ:
            env[key] = os.environ[key]
    actor_options["runtime_env"] = {"env_vars": env}
    deployment = serve.deployment(
        JudgeService,
        name="JudgeService",
        num_replicas=cfg.serve.replicas,
        ray_actor_options=actor_options,
        # Calls are split into chunks of pairs, so a full batch may need max_batch_size calls in flight.
        max_ongoing_requests=max(16, cfg.serve.max_batch_size),
        max_constructor_retry_count=3,  # a judge that cannot load fails the deployment in seconds
    )
    payload = cfg.model_dump()
    payload["serve"]["http"]["token"] = None  # never stored in Serve's config; replicas get its hash
    app = deployment.bind(payload, None if matrix is None else np.asarray(matrix, dtype=np.float64),
                          None if actions is None else list(actions),
                          None if token is None else _digest(token), name)
    try:
        return serve.run(app, name=name, route_prefix=route_prefix if http.enabled else None)
    except RuntimeError as e:
        reason = _deploy_failure(name) or e
        raise RuntimeError(f"judge {cfg.kind}: the service {name!r} failed to start: {reason}") from e


def _deploy_failure(app: str) -> str | None:
    """The last lines of the failing deployment's message (the replica's traceback), if Serve has one."""
    try:
        status = serve.status().applications[app]
        messages = [d.message for d in status.deployments.values() if d.message] or [status.message]
        lines = [ln for ln in "\n".join(messages).strip().splitlines() if ln.strip()]
        return " | ".join(lines[-3:]) or None
    except Exception:  # noqa: BLE001
        return None


def stop_judge_service(name: str = "judge") -> None:
    """Delete the Serve application ``name`` and its stats actor (Serve itself keeps running)."""
    import ray

    serve.delete(name)
    try:
        ray.kill(ray.get_actor(_stats_actor_name(name), namespace=STATS_NAMESPACE))
    except ValueError:
        pass


def service_url(cfg: JudgeConfig, route_prefix: str = "/") -> str:
    """``http://host:port/prefer`` for ``cfg.serve.http`` (IPv6 hosts in brackets)."""
    host = cfg.serve.http.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{cfg.serve.http.port}{route_prefix.rstrip('/')}/prefer"


def serve_judge(cfg: JudgeConfig, block: bool = True) -> Any:
    """Standalone judge server (``nlhf judge serve``).

    Connects to ``RAY_ADDRESS`` when set, else starts a local Ray cluster bound to 127.0.0.1;
    starts the service with HTTP enabled, prints the URL, and with ``block`` waits for Ctrl-C
    (or SIGTERM), then deletes the app, shuts Serve down if it started it, and disconnects.

    Returns:
        the handle (only when ``block`` is False; the caller then owns the shutdown).
    Raises:
        ConfigError: see :func:`start_judge_service` (checked before Ray starts).
    """
    import ray

    cfg = cfg.model_copy(deep=True)
    cfg.serve.http.enabled = True
    check_http_security(cfg.serve.http)  # fail before starting anything
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    started_serve = _serve_running_http() is None
    handle = start_judge_service(cfg)
    token_note = "; send 'Authorization: Bearer <token>'" if resolve_token(cfg.serve.http) else ""
    print(f"judge {cfg.kind} serving at POST {service_url(cfg)}{token_note}", flush=True)
    if not block:
        return handle
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("judge: shutting down", flush=True)
        try:
            stop_judge_service("judge")
            if started_serve:
                serve.shutdown()
        finally:
            ray.shutdown()
    return None

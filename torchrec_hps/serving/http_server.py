"""The Open Inference Protocol (KServe v2) over HTTP, served by uvicorn: inference requests by a bare ASGI
handler (InferFirst), health, metadata, repository load/unload and Prometheus `/metrics` by Starlette (the
ASGI core FastAPI is built on, without its per-request model validation: the tensors are checked once, in
requests.py). JSON bodies and the binary-tensor extension (`Inference-Header-Content-Length`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from torchrec_hps.serving.errors import RequestError
from torchrec_hps.serving.oip import tensors as oip

if TYPE_CHECKING:
    from torchrec_hps.serving.server import InferenceServer


def _json(data, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error_parts(e: RequestError) -> Tuple[int, bytes, List[Tuple[bytes, bytes]]]:
    """(status, body, extra headers) of an error answer: 429/503 say when to retry."""
    headers = [(b"retry-after", b"1")] if e.http_status in (429, 503) else []
    return e.http_status, orjson.dumps({"error": str(e)}), headers


def _error(e: RequestError) -> Response:
    status, body, headers = _error_parts(e)
    return Response(body, status_code=status, media_type="application/json",
                    headers={k.decode(): v.decode() for k, v in headers})


def build_app(server: "InferenceServer") -> "InferFirst":
    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        ok = server.ready()
        return _json({"ready": ok}, 200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        return _json(server.server_metadata())

    async def model_ready(request: Request) -> Response:
        ok = server.model_ready(request.path_params["name"], request.path_params.get("version"))
        return _json({"name": request.path_params["name"], "ready": ok}, 200 if ok else 503)

    async def model_metadata(request: Request) -> Response:
        try:
            return _json(server.model_metadata(request.path_params["name"], request.path_params.get("version")))
        except RequestError as e:
            return _error(e)

    async def load(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body() or b"{}")
            version = await server.load_model(request.path_params["name"], body.get("parameters") or {})
        except RequestError as e:
            return _error(e)
        except (ValueError, orjson.JSONDecodeError) as e:
            return _json({"error": str(e)}, 400)
        return _json({"name": request.path_params["name"], "version": version})

    async def unload(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body() or b"{}")
            removed = await server.unload_model(request.path_params["name"],
                                                (body.get("parameters") or {}).get("version"))
        except RequestError as e:
            return _error(e)
        return _json({"name": request.path_params["name"], "removed_tables": removed})

    async def metrics(request: Request) -> Response:
        body, content_type = server.metrics_text()
        return Response(body, media_type=content_type)

    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_metadata),
        Route("/v2/models/{name}", model_metadata), Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", unload, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    return InferFirst(server, Starlette(routes=routes))


def _infer_target(path: str) -> Optional[Tuple[str, Optional[str]]]:
    """(model, version) of /v2/models/{name}[/versions/{version}]/infer, else None."""
    parts = path.split("/")  # "", "v2", "models", name, ["versions", version,] "infer"
    if len(parts) == 5 and parts[4] == "infer" and parts[1] == "v2" and parts[2] == "models" and parts[3]:
        return parts[3], None
    if (len(parts) == 7 and parts[6] == "infer" and parts[4] == "versions" and parts[1] == "v2"
            and parts[2] == "models" and parts[3] and parts[5]):
        return parts[3], parts[5]
    return None


class InferFirst:
    """The ASGI app: inference requests are answered here, everything else by the Starlette app behind.
    Requests take this path by thousands a second, and Starlette's routing, Request and Response objects cost
    ~0.05 ms of a one-sample request's ~0.34 ms in the server (measured in process on the 2-core machine);
    uvicorn still does the HTTP."""

    def __init__(self, server: "InferenceServer", app: Starlette) -> None:
        self.server, self.app = server, app

    async def __call__(self, scope, receive, send) -> None:
        target = _infer_target(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if target is None:
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        header_len = None
        for k, v in scope["headers"]:
            if k == _HEADER_LENGTH_KEY:
                header_len = v.decode("latin-1")
        status, body, headers = await self._infer(target[0], target[1], raw, header_len)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode())] + headers})
        await send({"type": "http.response.body", "body": body})

    async def _infer(self, name: str, version: Optional[str], raw: bytes, header_len: Optional[str]
                     ) -> Tuple[int, bytes, List[Tuple[bytes, bytes]]]:
        server = self.server
        try:
            server.repository.get(name, version)  # an unknown model is a 404 whatever the body holds
            if header_len is not None:
                if not header_len.isdigit() or int(header_len) > len(raw):
                    raise RequestError(f"header Inference-Header-Content-Length={header_len!r} must be a byte "
                                       f"count <= the body's {len(raw)} bytes")
                head, tail = raw[:int(header_len)], memoryview(raw)[int(header_len):]
            else:
                head, tail = raw, memoryview(b"")
            try:
                body = orjson.loads(head)
            except orjson.JSONDecodeError as e:
                raise RequestError(f"the request body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object with 'inputs'")
            tensors = oip.decode_json_inputs(body, tail)
            params = body.get("parameters") or {}
            scores, used = await server.infer(name, version, tensors, timeout_ms=params.get("timeout_ms"),
                                              request_id=str(body.get("id") or ""))
        except RequestError as e:
            status, body, headers = _error_parts(e)
            return status, body, [_JSON] + headers
        head_out, tail_out = oip.encode_json_response(name, used, body.get("id"), "scores", scores,
                                                      oip.wants_binary(body, "scores"))
        if not tail_out:
            return 200, orjson.dumps(head_out), [_JSON]
        header = orjson.dumps(head_out)
        return 200, header + tail_out, [(b"content-type", b"application/octet-stream"),
                                        (_HEADER_LENGTH_KEY, str(len(header)).encode())]


_JSON = (b"content-type", b"application/json")
_HEADER_LENGTH_KEY = oip.HEADER_LENGTH.lower().encode()

"""The Open Inference Protocol (KServe v2) over HTTP, on Starlette (the ASGI core FastAPI is built on, without
its per-request model validation: the tensors are checked once, in requests.py). JSON bodies and the
binary-tensor extension (`Inference-Header-Content-Length`), health, metadata, repository load/unload and
Prometheus `/metrics`."""
from __future__ import annotations

from typing import TYPE_CHECKING

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


def _error(e: RequestError) -> Response:
    headers = {"Retry-After": "1"} if e.http_status in (429, 503) else None
    return Response(orjson.dumps({"error": str(e)}), status_code=e.http_status, media_type="application/json",
                    headers=headers)


def build_app(server: "InferenceServer") -> Starlette:
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

    async def infer(request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        raw = await request.body()
        try:
            server.repository.get(name, version)  # an unknown model is a 404 whatever the body holds
            header_len = request.headers.get(oip.HEADER_LENGTH)
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
            return _error(e)
        head_out, tail_out = oip.encode_json_response(name, used, body.get("id"), "scores", scores,
                                                      oip.wants_binary(body, "scores"))
        if not tail_out:
            return _json(head_out)
        header = orjson.dumps(head_out)
        return Response(header + tail_out, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(header))})

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
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", unload, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    return Starlette(routes=routes)

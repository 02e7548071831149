"""The Open Inference Protocol (KServe v2) over gRPC (grpcio's asyncio server, on the same event loop as
the HTTP frontend): health, metadata and ModelInfer with tensor contents or raw_input_contents in, scores
as raw_output_contents out (as Triton answers, so tritonclient's as_numpy reads them)."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import numpy as np

from torchrec_hps.serving.errors import RequestError
from torchrec_hps.serving.oip import grpc_predict_v2_pb2 as pb
from torchrec_hps.serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from torchrec_hps.serving.oip import tensors as oip

if TYPE_CHECKING:
    from torchrec_hps.serving.server import InferenceServer


def _client_gone(context) -> bool:
    """The call's deadline has passed: gRPC has cancelled it, so no answer can be sent (trying makes grpcio
    log an ExecuteBatchError with a traceback, one per such query under overload)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server: "InferenceServer") -> None:
        self.server = server

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.server.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.server.model_ready(request.name, request.version or None))

    async def ServerMetadata(self, request, context):
        meta = self.server.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def ModelMetadata(self, request, context):
        try:
            meta = self.server.model_metadata(request.name, request.version or None)
        except RequestError as e:
            await context.abort(e.grpc_code, str(e))
        tensors = lambda items: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in items]  # noqa: E731
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    async def ModelInfer(self, request, context):
        # a query whose client gave up (deadline passed, in gRPC's queue or in ours) is dropped quietly: a
        # cancelled call, not an error (before, a deadline already passed read as timeout_ms=0, a 400)
        if _client_gone(context):
            raise asyncio.CancelledError
        try:
            self.server.repository.get(request.model_name, request.model_version or None)
            tensors = oip.decode_grpc_inputs(request)
            timeout = request.parameters["timeout_ms"].int64_param if "timeout_ms" in request.parameters else None
            remaining = context.time_remaining()
            if remaining is not None:  # the client's gRPC deadline bounds the query's
                timeout = min(timeout or remaining * 1e3, remaining * 1e3)
            scores, used = await self.server.infer(request.model_name, request.model_version or None, tensors,
                                                   timeout_ms=timeout, request_id=request.id)
        except RequestError as e:
            if _client_gone(context):
                raise asyncio.CancelledError from None
            await context.abort(e.grpc_code, str(e))
        if _client_gone(context):
            raise asyncio.CancelledError
        out = pb.ModelInferResponse.InferOutputTensor(name="scores", datatype="FP32", shape=[int(scores.shape[0])])
        return pb.ModelInferResponse(model_name=request.model_name, model_version=used, id=request.id,
                                     outputs=[out],
                                     raw_output_contents=[np.ascontiguousarray(scores, np.float32).tobytes()])


def build_grpc_server(server: "InferenceServer", address: str) -> "tuple[grpc.aio.Server, int]":
    grpc_server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20),
                                           ("grpc.max_send_message_length", 256 << 20)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(server), grpc_server)
    port = grpc_server.add_insecure_port(address)
    return grpc_server, port

"""The serving node: ranking requests over the Open Inference Protocol (HTTP and gRPC) -> the DeepRecSys
scheduler -> GPU/CPU workers running models that hold HPSEmbeddingBagCollections."""
from torchrec_hps.serving.config import SchedulerConfig, ServedModelConfig, ServerConfig
from torchrec_hps.serving.models import ModelRepository, ServedVersion, save_served_model, signature_of
from torchrec_hps.serving.server import InferenceServer

__all__ = ["InferenceServer", "ModelRepository", "SchedulerConfig", "ServedModelConfig", "ServedVersion",
           "ServerConfig", "save_served_model", "signature_of"]

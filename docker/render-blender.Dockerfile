# The render image with the official Linux build of Blender instead of the bpy module. Not
# built by CI (it needs a Blender tarball); docker/build-images.sh builds it in place of
# render.Dockerfile when given one:
#
#   curl -LO https://download.blender.org/release/Blender5.0/blender-5.0.1-linux-x64.tar.xz
#   RENDER_BLENDER_TARBALL=$PWD/blender-5.0.1-linux-x64.tar.xz bash docker/build-images.sh
#
# The build context holds only blender.tar.xz; the build runs with --network none. The labels
# tell the Docker executor to run `blender -b --factory-startup ... --python SCRIPT -- ARGS`.
ARG BASE_IMAGE=renderfarm/base:bookworm

FROM ${BASE_IMAGE} AS unpack
LABEL renderfarm.build-stage=true
COPY blender.tar.xz /tmp/blender.tar.xz
RUN mkdir /opt/blender \
 && tar -xJf /tmp/blender.tar.xz -C /opt/blender --strip-components=1 --no-same-owner \
 && /opt/blender/blender --version

FROM ${BASE_IMAGE}
ARG BLENDER_VERSION=
RUN groupadd --gid 10001 renderfarm \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin renderfarm
COPY --from=unpack /opt/blender /opt/blender
ENV HOME=/tmp
LABEL renderfarm.blender=binary \
      renderfarm.blender.program=/opt/blender/blender \
      renderfarm.blender.version=${BLENDER_VERSION} \
      renderfarm.python=/usr/bin/python3
USER 10001:10001
WORKDIR /tmp
CMD ["/opt/blender/blender", "--version"]

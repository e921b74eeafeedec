# The one image for both console scripts: `smtprelay` (the relay pods) and
# `smtprelay-operator` (the chart's Deployment). Non-root, nothing writable but the volumes.
#
#   docker build -t smtprelay .
#
# BASE is the only thing a build may swap: any Debian-like image whose `pip` and `python3`
# on PATH are Python 3.11+. `make image` builds on a Debian base made with mmdebstrap
# (devcluster/image.py), where a venv on PATH stands in for the python image's pip.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay relay
COPY operator operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${BASE}
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin smtprelay \
 && mkdir -p /var/spool/smtprelay && chown 10001:10001 /var/spool/smtprelay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 2525 9090
ENTRYPOINT []
CMD ["smtprelay", "serve", "--config", "/etc/smtprelay/relay.yaml"]

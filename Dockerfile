# The one image for both console scripts: `smtprelay` (the relay pods) and
# `smtprelay-operator` (the chart's Deployment). Non-root, nothing writable but the volumes.
# (No Docker engine runs on the development machines; CI does not build this image yet.)
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay relay
COPY operator operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin smtprelay \
 && mkdir -p /var/spool/smtprelay && chown 10001:10001 /var/spool/smtprelay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 2525 9090
ENTRYPOINT []
CMD ["smtprelay", "serve", "--config", "/etc/smtprelay/relay.yaml"]

# Faurya Relay container image.
#
#   docker build -t faurya-relay .
#   docker run -d --name relay -p 8080:8080 -v relay-data:/data \
#     -e POLAR_WEBHOOK_SECRET=... -e FAURYA_URL=https://faurya.example \
#     -e FAURYA_SITE_ID=... -e FAURYA_WRITE_KEY=... \
#     faurya-relay
#
# Operator commands run against the same volume, e.g.
#   docker exec relay relay outbox list
#
# /metrics is on the admin listener, which relay.toml puts on 127.0.0.1:9090: inside the
# container, out of reach. To scrape it from outside, listen on every interface with a token
# (the relay refuses a non-loopback admin listener without one) and publish the port to the
# host's loopback or a private network only:
#   -e RELAY_ADMIN_LISTEN=0.0.0.0:9090 -e RELAY_ADMIN_TOKEN=<long random> \
#   -p 127.0.0.1:9090:9090

# ---------------------------------------------------------------- builder
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

WORKDIR /src
COPY . .
# The runtime dependencies and the build backend exactly as requirements.lock pins them, each
# file checked against its sha256 (a tampered or substituted package fails the build); then
# the project itself, with no dependency resolution and no other download. The lock is made
# by pip-compile (its header says how) and tests/test_lockfile.py keeps it in step with
# pyproject.toml. Then drop pip and setuptools from the venv: the relay does not need them at
# run time (~25 MB, and old setuptools versions are what image scanners flag).
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation --no-index . \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

# ---------------------------------------------------------------- runtime
FROM python:3.11-slim

# Non-root runtime user; /data is the database volume, owned by it. The chown must happen
# before VOLUME: later changes to a declared volume path are discarded.
RUN groupadd --gid 10001 relay \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin relay \
 && mkdir -p /data \
 && chown 10001:10001 /data \
 && chmod 0750 /data

# Only the installed virtualenv comes over from the builder: no sources, no build tools.
COPY --from=builder /opt/venv /opt/venv
# Also reachable where a shell with a reset PATH (docker exec, chroot) looks.
RUN ln -s /opt/venv/bin/relay /usr/local/bin/relay

ENV PATH="/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    RELAY_DB=/data/relay.db \
    RELAY_CONFIG=/app/relay.toml \
    PYTHONUNBUFFERED=1

WORKDIR /app
# Root-owned and read-only for the relay user.
COPY relay.toml /app/relay.toml

VOLUME /data
# 8080: webhooks (and /checkout, /healthz, /readyz), the port Polar reaches. 9090: the admin
# listener (/metrics), only once RELAY_ADMIN_LISTEN and RELAY_ADMIN_TOKEN are set (see above).
EXPOSE 8080 9090

USER 10001:10001

# Liveness via the relay's own /healthz, with the venv's python (no curl in the image).
# Follows RELAY_PORT if it is overridden.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RELAY_PORT', '8080'), timeout=2)"]

# Exec form: the relay is PID 1 and gets SIGTERM directly (it stops accepting, then gives
# in-flight deliveries server.shutdown_grace_s, 8 s in the shipped relay.toml: under
# `docker stop`'s default 10 s). If you raise it, give `docker stop` more than that, e.g.
# `docker stop -t 20` / compose `stop_grace_period: 20s`.
ENTRYPOINT ["relay"]
CMD ["serve"]

# Secure Your Server: one container running the site (uvicorn), its SQLite database under /app/var; the same image
# runs every part of the several-instance deployment in compose.yaml (serve, worker, listeners).
#
#   docker build -t secure-your-server .
#   docker run -d --name sys -p 8000:8000 -v sys-data:/app/var --env-file secure.env secure-your-server
#
# No build tools: every dependency is pure Python or ships manylinux wheels for CPython 3.11.

# Pinned to the Debian release (bookworm) so a rebuild never changes distribution underneath us.
# For fully reproducible builds, pin the digest too: python:3.11-slim-bookworm@sha256:...
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

WORKDIR /app

# 1. Dependencies first, in their own layer, so that a change to the code does not reinstall them.
#    The list is read from pyproject.toml itself (tomllib is in the standard library), so it cannot drift.
#    README.md comes along because pyproject.toml names it as the package's readme (setuptools needs it).
#    EXTRAS names the optional extras installed beside them: PostgreSQL (the shared store and the job queue) and
#    Redis (shared limits), for several instances (compose.yaml); `--build-arg EXTRAS=` leaves them out.
ARG EXTRAS="postgres redis"
COPY pyproject.toml README.md ./
RUN python -c "import os, tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = project['dependencies'] + [d for extra in os.environ['EXTRAS'].split() for d in project['optional-dependencies'][extra]]; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm -f /tmp/requirements.txt

# 2. The site itself. The code finds templates/, static/, guides/ and data/ relative to its own source
#    (Path(__file__).parent.parent), so it must run from this tree, not from a copy in site-packages:
#    a plain `pip install .` would copy only the packages and the site would start without its templates.
#    An editable install keeps the code at /app/app and still provides the `secure-your-server` console
#    script; it also picks up any subpackage that pyproject.toml's explicit package list may lack.
COPY app/ ./app/
COPY templates/ ./templates/
COPY static/ ./static/
COPY guides/ ./guides/
COPY data/ ./data/
COPY locales/ ./locales/
RUN pip install --no-cache-dir -e . \
 && python -m compileall -q app \
 && pybabel compile -d locales \
 && secure-your-server check-guides

# 3. An unprivileged user that owns only the database directory; the code stays root-owned and read-only.
#    (Not named "sys": Debian already has a system user and group of that name, uid/gid 3.)
RUN groupadd --gid 10001 secure \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin secure \
 && mkdir -p /app/var \
 && chown 10001:10001 /app/var \
 && chmod 0750 /app/var

# Numeric, so that orchestrators can verify "not root" (e.g. Kubernetes runAsNonRoot) without /etc/passwd.
USER 10001:10001

# Mount a volume here to keep audits across containers: docker run -v sys-data:/app/var ...
ENV SECURE_DATABASE_URL=sqlite:////app/var/secure-your-server.db

EXPOSE 8000

# No curl in the slim image: Python's own urllib asks /healthz (it also checks that the database answers).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).read()"]

# Exec form: the server is PID 1 and gets SIGTERM itself, so `docker stop` shuts it down cleanly
# (running audits are marked interrupted). uvicorn's proxy-header handling stays off; put the reverse
# proxy's address in SECURE_TRUSTED_PROXIES instead (see README).
CMD ["secure-your-server", "serve", "--host", "0.0.0.0", "--port", "8000"]

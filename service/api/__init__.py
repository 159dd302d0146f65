"""The REST API under /v1: routers (``registry``, ``jobs``, ``plans``), their schemas, problem+json errors,
tokens (``auth``), the guard every request meets first, and streaming uploads and downloads (``transfer``)."""

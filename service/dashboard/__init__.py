"""The web dashboard: server-rendered pages (``pages``) with their templates and static files."""

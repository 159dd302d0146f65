"""Uploads and job requests checked without running them: the checks (``checks``, run as a sandboxed
process), the pool of those processes (``inspector``) and the translation of stored uploads and API bodies
into what the libraries take (``model_files``)."""

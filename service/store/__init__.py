"""Persistence: the engine and schema version (``db``), the ORM tables (``tables``), the content-addressed
blob store (``blobs``) and what blobs the rows still reference (``storage``)."""

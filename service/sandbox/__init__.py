"""Least privilege for every process that opens a user's file: the sandboxed child (``child``) and the
channel of JSON frames and descriptors that is its only link back (``channel``)."""

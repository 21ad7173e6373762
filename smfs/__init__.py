"""The SMFS mirroring stack: log store, wire protocol, primary and mirror storage servers,
the five mirroring modes, the Maelstrom FEC gateway and a client library.

Protocol logic is pure (bytes and time in, bytes and events out); asyncio glue is thin.
"""

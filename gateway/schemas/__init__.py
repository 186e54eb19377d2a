"""Packaged JSON documents: the seed's batch OpenAPI (000), the source of the JSON batch shapes.

Read with importlib.resources by gateway/openapi_batch.py (and the tests); nothing to import here.
"""

"""Packaged JSON documents: the seed batch OpenAPI (000) and the gateway's own OpenAPI.

Read with importlib.resources; nothing to import here.
"""

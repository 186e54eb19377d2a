"""Sans-I/O wire formats: batch request bytes to the neutral model, and results back to bytes.

Nothing here imports aiohttp or touches the network.
"""

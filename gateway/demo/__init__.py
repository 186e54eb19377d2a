"""Built-in demo upstreams (a legacy CRUD service and a transactional one) and the demo launcher.

The same services are the fixtures of the test suite.
"""

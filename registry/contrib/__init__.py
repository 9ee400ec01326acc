"""Optional integrations of the registry with other frameworks, each behind an extra.

``registry.contrib.asgi``: HTTP routes, a lifespan and error mapping on Starlette (the ``asgi``
extra: ``pip install 'registry[asgi]'``).
"""

"""A blocking store in a shard group, served by gunicorn's aiohttp workers that attach to it.

See README in docs/external.md ("A real embedding"): ``daemon`` starts the group with
``listen=``, ``app`` is the aiohttp application every gunicorn worker runs, ``store``
holds what runs on the shards.
"""
